"""A seeded stand-in for the published bottom-up-attention checkpoint (same keys, shapes and file layout).

The reference extractor (MILVLG/bottom-up-attention.pytorch 4dbce86 with detectron2 be792b9, config
``configs/caffe/test-caffe-r101-fix36.yaml``: ResNet-101 C4, ``RES5_DILATION 2``, 1601 object classes, 401
attributes, RPN conv 512 channels, 12 anchors) builds a model whose ``state_dict`` has 616 entries; the published
``bua-caffe-frcn-r101_with_attributes.pth`` is loaded into it by detectron2's ``DetectionCheckpointer`` from
``{"model": state_dict}``. :func:`seeded_state_dict` produces every one of those entries, in the model's order, with
the model's shapes and dtypes (BN ``num_batches_tracked`` counters included, 0), filled from a CPU
``torch.Generator`` so that it is bit-identical on every machine: all random numbers are float32 uniforms in [0, 1)
(``torch.rand``: 24 bits of Mersenne-Twister output, converted exactly), then one multiplication and one addition
(separate, correctly rounded IEEE operations); no Gaussian sampler or transcendental function (whose vectorised
versions may differ between CPUs) is involved.

Values are chosen so that a forward pass stays in a sane range (no detector output saturates, scores are not tied):
He-uniform convolutions (the stem's scaled down for 0..255 pixel input), BN scale near 1 except each bottleneck's last
BN (small: the residual branch starts close to the identity but still contributes), small BN shifts and means,
running variances near 1, output layers scaled by 1/sqrt(fan-in) times a head-specific scale, and caffe's 12 RPN
anchors in ``proposal_generator.anchor_generator.cell_anchors.0`` (the reference loads its anchors from the
checkpoint; values from caffe's ``generate_anchors`` with base 16, ratios 0.5/1/2, scales 4/8/16/32, as in
peteanderson80/bottom-up-attention ``models/vg/ResNet-101/faster_rcnn_end2end_final/test.prototxt``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch

from itmatch.utils.tensors import save_tensors

# ResNet-101 (detectron2 R-101: blocks per stage res2..res5; res5 lives in roi_heads).
BLOCKS = {"res2": 3, "res3": 4, "res4": 23, "res5": 3}
STEM_CHANNELS = 64
RES2_OUT = 256
NUM_CLASSES = 1601  # Visual Genome objects + background (ROI_HEADS.NUM_CLASSES of the bua-caffe configs)
NUM_ATTRIBUTES = 401  # MODEL.BUA.ATTRIBUTE.NUM_CLASSES
RPN_CHANNELS = 512  # MODEL.BUA.RPN.CONV_OUT_CHANNELS
NUM_ANCHORS = 12
CLS_EMBED_DIM = 256  # bua/caffe/modeling/fast_rcnn.py: nn.Embedding(num_classes, 256)
ATTR_HIDDEN = 512  # attr_linear1 output
FEATURE_DIM = 2048

# caffe lib/rpn/generate_anchors.py (base 16, ratios 0.5/1/2, scales 4/8/16/32): ratio-major, (x1, y1, x2, y2).
CAFFE_ANCHORS = [
    [-38, -16, 53, 31], [-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
    [-24, -24, 39, 39], [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
    [-14, -36, 29, 51], [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359],
]

# Scales (chosen by running the reference on tests/fixtures/reference/images; see tests/fixtures/reference/README.md).
STEM_GAIN = 1.0 / 64.0  # input pixels are mean-subtracted 0..255 values: bring stem outputs near unit scale
LAST_BN_SCALE = 0.2  # BN scale of each bottleneck's conv3 norm (residual branch near, not at, the identity)
RPN_OBJECTNESS_SCALE = 0.6  # std of RPN logits ≈ this (per unit-scale input): fg-bg differences spread widely ...
RPN_OBJECTNESS_SHIFT = 3.5  # ... and shifted down by 2x this (bg biases +, fg biases -), so the kept proposals' fg
# probabilities lie mid-range (~0.3-0.99) where float32 resolves them finely, instead of all crowding near 1
RPN_DELTA_SCALE = 0.05  # std of RPN box deltas
CLS_SCALE = 0.75  # std of class logits across classes
CLS_BIAS = 1.0  # half-width of the uniform class-logit biases
BBOX_SCALE = 0.05  # std of class-specific box deltas (unused by extraction mode 1, present in the layout)
ATTR_SCALE = 0.6  # std of attribute logits
EMBED_SCALE = 1.0  # std of the class embedding

EXPECTED_KEYS = 616  # len(model.state_dict()) of the reference model built from test-caffe-r101-fix36.yaml


def _module_names() -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(prefix, kind, shape) in the reference model's state-dict order; kind: conv, frozen_bn, bn, ..."""
    yield "backbone.stem.conv1", "conv", (STEM_CHANNELS, 3, 7, 7)
    yield "backbone.stem.conv1.norm", "frozen_bn", (STEM_CHANNELS,)
    in_ch, out_ch, bott = STEM_CHANNELS, RES2_OUT, STEM_CHANNELS
    for stage, n in BLOCKS.items():
        prefix = f"roi_heads.{stage}" if stage == "res5" else f"backbone.{stage}"
        # FREEZE_AT 3 freezes the stem, res2 and res3 (FrozenBatchNorm2d, no counter); res4/res5 use nn.BatchNorm2d.
        norm = "frozen_bn" if stage in ("res2", "res3") else "bn"
        for i in range(n):
            block = f"{prefix}.{i}"
            if i == 0:
                yield f"{block}.shortcut", "conv", (out_ch, in_ch, 1, 1)
                yield f"{block}.shortcut.norm", norm, (out_ch,)
            yield f"{block}.conv1", "conv", (bott, in_ch if i == 0 else out_ch, 1, 1)
            yield f"{block}.conv1.norm", norm, (bott,)
            yield f"{block}.conv2", "conv", (bott, bott, 3, 3)
            yield f"{block}.conv2.norm", norm, (bott,)
            yield f"{block}.conv3", "conv", (out_ch, bott, 1, 1)
            yield f"{block}.conv3.norm", norm + "_last", (out_ch,)
        if stage == "res4":
            yield "proposal_generator.anchor_generator.cell_anchors", "anchors", (NUM_ANCHORS, 4)
            yield "proposal_generator.rpn_head.conv", "conv_bias", (RPN_CHANNELS, out_ch, 3, 3)
            yield "proposal_generator.rpn_head.objectness_logits", "objectness", (2 * NUM_ANCHORS, RPN_CHANNELS, 1, 1)
            yield "proposal_generator.rpn_head.anchor_deltas", "deltas", (4 * NUM_ANCHORS, RPN_CHANNELS, 1, 1)
        in_ch, out_ch, bott = out_ch, out_ch * 2, bott * 2
    yield "roi_heads.box_predictor.cls_score", "cls", (NUM_CLASSES, FEATURE_DIM)
    yield "roi_heads.box_predictor.bbox_pred", "bbox", (4 * NUM_CLASSES, FEATURE_DIM)
    yield "roi_heads.box_predictor.cls_embed", "embed", (NUM_CLASSES, CLS_EMBED_DIM)
    yield "roi_heads.box_predictor.attr_linear1", "attr1", (ATTR_HIDDEN, FEATURE_DIM + CLS_EMBED_DIM)
    yield "roi_heads.box_predictor.attr_linear2", "attr2", (NUM_ATTRIBUTES, ATTR_HIDDEN)


def _uniform(g: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    """float32 uniforms in [low, high), exact given the generator state (no transcendental functions)."""
    return torch.rand(shape, generator=g, dtype=torch.float32) * (high - low) + low


def _sym(g: torch.Generator, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """Zero-mean uniform values with standard deviation ``std`` (half-width sqrt(3)·std)."""
    half = 3.0**0.5 * std
    return _uniform(g, shape, -half, half)


def _norm(g: torch.Generator, prefix: str, n: int, scale: float, counter: bool) -> dict[str, torch.Tensor]:
    out = {
        f"{prefix}.weight": _uniform(g, (n,), 0.9 * scale, 1.1 * scale),
        f"{prefix}.bias": _uniform(g, (n,), -0.05, 0.05),
        f"{prefix}.running_mean": _uniform(g, (n,), -0.05, 0.05),
        f"{prefix}.running_var": _uniform(g, (n,), 0.8, 1.2),
    }
    if counter:
        out[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    return out


def _linear(g: torch.Generator, prefix: str, shape: tuple[int, ...], out_std: float, bias_half: float = 0.0,
            ) -> dict[str, torch.Tensor]:
    """Weights with std out_std/sqrt(fan_in) (outputs ≈ out_std for unit-scale inputs), uniform biases."""
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return {f"{prefix}.weight": _sym(g, shape, out_std / fan_in**0.5),
            f"{prefix}.bias": _uniform(g, (shape[0],), -bias_half, bias_half)}


def seeded_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The reference model's full state dict (616 entries), filled deterministically from ``seed``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for prefix, kind, shape in _module_names():
        if kind == "conv":
            fan_in = shape[1] * shape[2] * shape[3]
            gain = STEM_GAIN if prefix == "backbone.stem.conv1" else 1.0
            state[f"{prefix}.weight"] = _sym(g, shape, gain * (2.0 / fan_in) ** 0.5)  # He (ReLU follows)
        elif kind in ("frozen_bn", "bn", "frozen_bn_last", "bn_last"):
            scale = LAST_BN_SCALE if kind.endswith("_last") else 1.0
            state.update(_norm(g, prefix, shape[0], scale, counter=kind.startswith("bn")))
        elif kind == "anchors":
            state[f"{prefix}.0"] = torch.tensor(CAFFE_ANCHORS, dtype=torch.float32)
        elif kind == "conv_bias":
            state.update(_linear(g, prefix, shape, 2.0**0.5, bias_half=0.05))
        elif kind == "objectness":
            layer = _linear(g, prefix, shape, RPN_OBJECTNESS_SCALE, bias_half=0.5)
            # channels [0, A) are background logits, [A, 2A) foreground (softmax over the pair, rpn_outputs.py)
            shift = torch.full((shape[0],), RPN_OBJECTNESS_SHIFT)
            shift[NUM_ANCHORS:] = -RPN_OBJECTNESS_SHIFT
            layer[f"{prefix}.bias"] = layer[f"{prefix}.bias"] + shift
            state.update(layer)
        elif kind == "deltas":
            state.update(_linear(g, prefix, shape, RPN_DELTA_SCALE, bias_half=0.05))
        elif kind == "cls":
            state.update(_linear(g, prefix, shape, CLS_SCALE, bias_half=CLS_BIAS))
        elif kind == "bbox":
            state.update(_linear(g, prefix, shape, BBOX_SCALE, bias_half=0.02))
        elif kind == "embed":
            state[f"{prefix}.weight"] = _sym(g, shape, EMBED_SCALE)
        elif kind == "attr1":
            state.update(_linear(g, prefix, shape, 2.0**0.5, bias_half=0.05))
        elif kind == "attr2":
            state.update(_linear(g, prefix, shape, ATTR_SCALE, bias_half=0.5))
        else:  # pragma: no cover - the table above is closed
            raise AssertionError(kind)
    if len(state) != EXPECTED_KEYS:  # pragma: no cover - guards edits of the table
        raise AssertionError(f"seeded state dict has {len(state)} entries, expected {EXPECTED_KEYS}")
    return state


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every entry's name, dtype, shape and raw bytes, in order."""
    h = hashlib.sha256()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def write_seeded_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write ``{"model": seeded_state_dict(seed)}`` with ``torch.save`` (the layout detectron2's
    ``DetectionCheckpointer`` reads from a ``.pth``), atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, {"model": seeded_state_dict(seed)})
    return path
