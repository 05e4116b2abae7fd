"""Checkpoints: our own trained detector (``model.pt``) and published bottom-up-attention weights.

Published weights: the detectron2-format conversion of the caffe bottom-up-attention ResNet-101 model
with attributes (e.g. ``bua-caffe-frcn-r101_with_attributes.pth`` of MILVLG/bottom-up-attention.pytorch):
a ``.pth`` (torch tensors, optionally under ``"model"``) state dict with

published key (shape for R-101, 1601/401)                      our module
---------------------------------------------------------------  ----------------------------------
backbone.stem.conv1.weight [64,3,7,7], .norm.* [64]              same name
backbone.res{2,3,4}.{i}.{conv1,conv2,conv3,shortcut}.weight/.norm same name
roi_heads.res5.{i}.… (res5 blocks, 2048 out)                     same name
proposal_generator.rpn_head.conv.* [512,1024,3,3]                rpn.rpn_head.conv
proposal_generator.rpn_head.objectness_logits.* [2A,512,1,1]     rpn.rpn_head.objectness_logits
proposal_generator.rpn_head.anchor_deltas.* [4A,512,1,1]         rpn.rpn_head.anchor_deltas
roi_heads.box_predictor.cls_score.* [1601,2048]                  same name
roi_heads.box_predictor.bbox_pred.* [6404,2048]                  same name
roi_heads.box_predictor.cls_embed.weight [1602,256]              roi_heads.attribute_head.cls_embed
roi_heads.box_predictor.attr_linear1.* [512,2304]                roi_heads.attribute_head.fc
roi_heads.box_predictor.attr_linear2.* [401,512]                 roi_heads.attribute_head.score

proposal_generator.anchor_generator.cell_anchors.0 [A,4]          rpn.anchor_generator.cell_anchors.0 (optional)

(A = 12 anchors: 4 scales × 3 ratios.)

``.norm.*`` = ``weight, bias, running_mean, running_var``. The anchors are a buffer of the reference model's
state dict, so loading a checkpoint replaces the configured ones, as detectron2's checkpointer does in the
reference; a checkpoint without them keeps the configured anchors (``detector.published``: caffe's
``generate_anchors``). Keys that carry no weights are skipped by name: BN ``num_batches_tracked`` counters
and stored pixel statistics (``pixel_mean``, ``pixel_std``; ours come from the config). Any other missing,
unexpected or mis-shaped key stops loading with a message naming it and the shape the model expects.

Every file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, so a crafted
checkpoint cannot run code. A published ``.pkl`` (a pickle, which can) is refused with a pointer to the
one-off converter ``python -m itmatch.features.detector.convert IN.pkl OUT.pth``
(:mod:`itmatch.features.detector.convert`), which reads numpy arrays only.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itmatch.features.detector.model import BottomUpDetector, build_model
from itmatch.utils.hashing import sha256_file
from itmatch.utils.tensors import load_tensors, save_tensors

FORMAT = "itmatch-bottom-up-detector"
# (our prefix, published prefix): applied in order, first match wins; unlisted prefixes keep their name.
KEY_MAP: list[tuple[str, str]] = [
    ("rpn.rpn_head.", "proposal_generator.rpn_head."),
    ("rpn.anchor_generator.", "proposal_generator.anchor_generator."),
    ("roi_heads.attribute_head.cls_embed.", "roi_heads.box_predictor.cls_embed."),
    ("roi_heads.attribute_head.fc.", "roi_heads.box_predictor.attr_linear1."),
    ("roi_heads.attribute_head.score.", "roi_heads.box_predictor.attr_linear2."),
    ("backbone.", "backbone."),
    ("roi_heads.res5.", "roi_heads.res5."),
    ("roi_heads.box_predictor.", "roi_heads.box_predictor."),
]
IGNORED = re.compile(r"(\.num_batches_tracked$|(^|\.)pixel_(mean|std)$)")
OPTIONAL = re.compile(r"(^|\.)anchor_generator\.cell_anchors\.0$")  # may be absent: the configured anchors stay


class CheckpointError(ValueError):
    """A checkpoint does not match the architecture (names the keys)."""


CONVERT_HINT = "python -m itmatch.features.detector.convert {src} {dst}"


def _refusal_reason(e: Exception) -> str:
    """The line of torch's weights-only refusal that names the offending global (else its first line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln or "global" in ln.split(":")[0] or "Unsupported" in ln]
    return (named or lines or [type(e).__name__])[0]


def _load_tensors(path: Path, mmap: bool = False) -> Any:
    """:func:`itmatch.utils.tensors.load_tensors` on the CPU (tensors and plain containers only: never runs code
    from the file); a refused file raises :class:`CheckpointError` naming it and the converter for numpy-array
    checkpoints."""
    try:
        return load_tensors(path, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = _refusal_reason(e)
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain containers, and loading it could run "
            f"code ({first}). Only tensor checkpoints are read; a published checkpoint of numpy arrays can be "
            f"converted once with `{CONVERT_HINT.format(src=path, dst=path.with_suffix('.converted.pth'))}`"
        ) from None


def published_name(ours: str) -> str:
    for mine, theirs in KEY_MAP:
        if ours.startswith(mine):
            return theirs + ours[len(mine):]
    raise CheckpointError(f"no published name for model key {ours!r} (extend KEY_MAP)")


def key_mapping(model: BottomUpDetector) -> dict[str, str]:
    """published key → our state-dict key, for every weight of ``model``."""
    return {published_name(k): k for k in model.state_dict() if not IGNORED.search(k)}


def read_checkpoint(path: str | Path) -> Any:
    """The object stored in a checkpoint file, ``torch.load``-ed on the CPU with ``weights_only=True``; a
    ``.pkl`` is refused (convert it once, see :mod:`itmatch.features.detector.convert`). Pass it to
    :func:`load_own` / :func:`load_published` as ``loaded=`` to read the file only once."""
    path = Path(path)
    if path.suffix == ".pkl":
        raise CheckpointError(
            f"{path}: .pkl checkpoints are not read (unpickling a downloaded file can run arbitrary code). "
            f"Convert it once into tensors: `{CONVERT_HINT.format(src=path, dst=path.with_suffix('.pth'))}`, "
            f"then set detector.checkpoints.<dataset> to the .pth")
    return _load_tensors(path)


def read_state_dict(path: str | Path, loaded: Any = None) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth`` / ``.pt`` file (a ``.pkl`` is refused: convert it first).
    ``loaded``: the file's :func:`read_checkpoint` object, when already read (``path`` then names it)."""
    path = Path(path)
    obj = read_checkpoint(path) if loaded is None else loaded
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a state dict (got {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if isinstance(v, torch.Tensor):
            out[k] = v
        elif not IGNORED.search(k):
            raise CheckpointError(f"{path}: key {k!r} holds a {type(v).__name__}, not an array")
    return out


def load_published(model: BottomUpDetector, path: str | Path, loaded: Any = None) -> None:
    """Copy published weights into ``model`` through :data:`KEY_MAP`; raise naming every bad key.
    ``loaded``: the file's :func:`read_checkpoint` object, when already read."""
    state = read_state_dict(path, loaded)
    mapping = key_mapping(model)
    ours = model.state_dict()
    missing = sorted(f"{k} (expected shape {tuple(ours[mapping[k]].shape)})" for k in mapping
                     if k not in state and not OPTIONAL.search(k))
    unexpected = sorted(k for k in state if k not in mapping and not IGNORED.search(k))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(ours[mapping[k]].shape)} (expected)"
                    for k in mapping if k in state and tuple(state[k].shape) != tuple(ours[mapping[k]].shape))
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", shapes)):
        if items:
            shown = "\n    ".join(items[:25]) + (f"\n    … and {len(items) - 25} more" if len(items) > 25 else "")
            problems.append(f"  {title} ({len(items)}):\n    {shown}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the detector architecture "
                              "(config detector.published):\n" + "\n".join(problems))
    new = {mapping[k]: state[k].to(ours[mapping[k]].dtype) for k in mapping if k in state}
    model.load_state_dict(new, strict=False)  # only skipped counters (and absent optional anchors) remain unset


def is_own_checkpoint(path: str | Path) -> bool:
    if Path(path).suffix == ".pkl":
        return False
    try:
        obj = _load_tensors(Path(path), mmap=True)
    except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
        obj = _load_tensors(Path(path))
    return is_own_object(path, obj)


def is_own_object(path: str | Path, obj: Any) -> bool:
    """Whether ``obj``, read from ``path`` by :func:`read_checkpoint`, is our own checkpoint."""
    return Path(path).suffix != ".pkl" and isinstance(obj, dict) and obj.get("format") == FORMAT


def save_own(path: str | Path, model: BottomUpDetector, input_cfg: dict, object_names: list[str],
             attribute_names: list[str], extra: dict[str, Any] | None = None) -> None:
    """Write our self-describing checkpoint atomically (architecture, input normalisation, class names)."""
    payload = {"format": FORMAT, "version": 1, "arch": model.arch, "input": dict(input_cfg),
               "object_names": list(object_names), "attribute_names": list(attribute_names),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **(extra or {})}
    save_tensors(path, payload)


def load_own(path: str | Path, loaded: Any = None) -> tuple[BottomUpDetector, dict]:
    """Our checkpoint's model and payload; ``loaded``: the file's :func:`read_checkpoint` object, when already
    read."""
    obj = _load_tensors(Path(path)) if loaded is None else loaded
    model = build_model(obj["arch"])
    missing, unexpected = model.load_state_dict(obj["state_dict"], strict=False)
    missing = [k for k in missing if not IGNORED.search(k) and not OPTIONAL.search(k)]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: missing keys {missing}, unexpected keys {unexpected}")
    return model, obj


def weights_sha256(path: str | Path) -> str:
    return sha256_file(path)
