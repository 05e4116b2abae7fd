"""Published bottom-up-attention checkpoint layout (R-101, 1601 objects / 401 attributes incl. background):
a checkpoint written here with random weights loads with no missing/unexpected keys and extracts 36 regions;
a wrong key fails naming it."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from itmatch.config import load_config
from itmatch.features.detector import detect, detector_config, load_detector, preprocess
from itmatch.features.detector.checkpoint import CheckpointError
from itmatch.features.detector.convert import convert
from tests.conftest import REPO


def published_r101_shapes() -> dict[str, tuple[int, ...]]:
    """Key → shape of the detectron2-format caffe bottom-up-attention R-101 model with attributes, written out
    from the published layout (not from our model)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cout, cin, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.norm.{p}"] = (cout,)

    conv("backbone.stem.conv1", 64, 3, 7)
    cin = 64
    for stage, n, mid, cout, prefix in ((2, 3, 64, 256, "backbone"), (3, 4, 128, 512, "backbone"),
                                        (4, 23, 256, 1024, "backbone"), (5, 3, 512, 2048, "roi_heads")):
        for i in range(n):
            name = f"{prefix}.res{stage}.{i}"
            if i == 0:
                conv(f"{name}.shortcut", cout, cin, 1)
            conv(f"{name}.conv1", mid, cin if i == 0 else cout, 1)
            conv(f"{name}.conv2", mid, mid, 3)
            conv(f"{name}.conv3", cout, mid, 1)
        cin = cout
    a = 12  # anchors: 4 sizes × 3 aspect ratios
    for name, shape in (("conv", (512, 1024, 3, 3)), ("objectness_logits", (2 * a, 512, 1, 1)),
                        ("anchor_deltas", (4 * a, 512, 1, 1))):
        shapes[f"proposal_generator.rpn_head.{name}.weight"] = shape
        shapes[f"proposal_generator.rpn_head.{name}.bias"] = (shape[0],)
    bp = "roi_heads.box_predictor"
    shapes.update({f"{bp}.cls_score.weight": (1601, 2048), f"{bp}.cls_score.bias": (1601,),
                   f"{bp}.bbox_pred.weight": (1601 * 4, 2048), f"{bp}.bbox_pred.bias": (1601 * 4,),
                   f"{bp}.cls_embed.weight": (1601, 256),  # nn.Embedding(NUM_CLASSES, 256), reference head
                   f"{bp}.attr_linear1.weight": (512, 2048 + 256), f"{bp}.attr_linear1.bias": (512,),
                   f"{bp}.attr_linear2.weight": (401, 512), f"{bp}.attr_linear2.bias": (401,)})
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for k, s in shapes.items():
        if k.endswith("running_var"):
            out[k] = np.ones(s, np.float32)
        elif k.endswith("running_mean") or k.endswith(".bias"):
            out[k] = np.zeros(s, np.float32)
        elif k.endswith("norm.weight"):
            out[k] = np.full(s, 0.5, np.float32)
        else:
            fan_in = int(np.prod(s[1:])) if len(s) > 1 else 1
            out[k] = (rng.standard_normal(s, dtype=np.float32) / np.float32(np.sqrt(fan_in))).astype(np.float32)
    out["backbone.res2.0.conv1.norm.num_batches_tracked"] = np.zeros((), np.int64)  # skipped by name
    return out


@pytest.fixture(scope="module")
def cfg() -> dict:
    c = detector_config(load_config(REPO / "config" / "config.yaml")["detector"], "coco")
    c["inference"].update({"min_size": 128, "max_size": 160, "pre_nms": 1000, "post_nms": 40, "regions": 36,
                           "num_regions": "fixed", "box_source": "proposals"})
    c["published"] = {**c["published"], "pooler_resolution": 7}  # faster on CPU; no weight depends on it
    return c


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple:
    """The published .pkl layout, converted once by the documented converter (the loader refuses .pkl)."""
    state = random_state(published_r101_shapes())
    pkl = tmp_path_factory.mktemp("bua") / "faster_rcnn_r101_attr.pkl"
    with open(pkl, "wb") as fh:
        pickle.dump({"model": state, "__author__": "test"}, fh)
    path = pkl.with_suffix(".pth")
    assert convert(pkl, path) == len(state)
    return path, state


@pytest.fixture(scope="module")
def loaded(published, cfg):
    return load_detector(str(published[0]), cfg)


def test_published_checkpoint_loads_and_extracts_36_regions(loaded, cfg):
    model, meta = loaded
    assert meta["feature_dim"] == 2048
    assert len(meta["object_names"]) == 1600 and len(meta["attribute_names"]) == 400
    assert len(meta["weights_sha256"]) == 64 and "R-101" in meta["detector"]
    rng = np.random.default_rng(1)
    raw = [rng.integers(0, 255, (120, 150, 3), dtype=np.uint8), rng.integers(0, 255, (100, 90, 3), dtype=np.uint8)]
    pre = [preprocess(im, cfg) for im in raw]
    assert pre[0][0].shape == (3, 128, 160) and abs(pre[0][1] - 128 / 120) < 1e-6
    out = detect(model, [p[0] for p in pre], [p[1] for p in pre], [im.shape[:2] for im in raw], cfg)
    assert len(out) == 2
    for r, im in zip(out, raw, strict=True):
        assert r["features"].shape == (36, 2048) and r["features"].dtype == np.float32
        assert r["boxes"].shape == (36, 4) and r["boxes"].dtype == np.float32
        assert (r["boxes"][:, 0] >= 0).all() and (r["boxes"][:, 2] <= im.shape[1] + 1e-3).all()
        assert (r["boxes"][:, 3] <= im.shape[0] + 1e-3).all()
        for key, n in (("object_id", 1600), ("attribute_id", 400)):
            assert r[key].dtype == np.int64 and r[key].shape == (36,)
            assert ((r[key] >= 0) & (r[key] < n)).all()
        for key in ("object_conf", "attribute_conf"):
            assert r[key].dtype == np.float32 and ((r[key] > 0) & (r[key] <= 1)).all()


def test_published_checkpoint_weights_land_in_the_right_modules(published, loaded):
    state = published[1]
    sd = loaded[0].state_dict()
    np.testing.assert_array_equal(sd["roi_heads.attribute_head.fc.weight"].numpy(),
                                  state["roi_heads.box_predictor.attr_linear1.weight"])
    np.testing.assert_array_equal(sd["rpn.rpn_head.objectness_logits.weight"].numpy(),
                                  state["proposal_generator.rpn_head.objectness_logits.weight"])
    np.testing.assert_array_equal(sd["backbone.res4.22.conv3.norm.running_var"].numpy(),
                                  state["backbone.res4.22.conv3.norm.running_var"])


def _write(tmp_path, state, name="bad.pth"):
    path = tmp_path / name
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, path)
    return path


def test_wrong_key_fails_naming_it(published, cfg, tmp_path):
    _, state = published
    bad = dict(state)
    bad["roi_heads.box_predictor.attr_linear_1.weight"] = bad.pop("roi_heads.box_predictor.attr_linear1.weight")
    with pytest.raises(CheckpointError) as err:
        load_detector(str(_write(tmp_path, bad)), cfg)
    msg = str(err.value)
    assert "missing keys (1)" in msg and "roi_heads.box_predictor.attr_linear1.weight" in msg
    assert "roi_heads.box_predictor.attr_linear1.weight (expected shape (512, 2304))" in msg
    assert "unexpected keys (1)" in msg and "roi_heads.box_predictor.attr_linear_1.weight" in msg


def test_mis_shaped_key_fails_naming_it(published, cfg, tmp_path):
    _, state = published
    bad = dict(state)
    bad["roi_heads.box_predictor.cls_score.weight"] = np.zeros((1600, 2048), np.float32)
    with pytest.raises(CheckpointError, match=r"roi_heads\.box_predictor\.cls_score\.weight: checkpoint "
                                              r"\(1600, 2048\) vs model \(1601, 2048\)"):
        load_detector(str(_write(tmp_path, bad)), cfg)


def test_missing_checkpoint_names_the_config_key(cfg):
    from itmatch.features.detector import checkpoint_path

    c = copy.deepcopy(cfg)
    with pytest.raises(FileNotFoundError, match="detector.checkpoints.coco"):
        checkpoint_path(c, "coco")
    c["checkpoints"]["coco"] = "/nonexistent/bua.pth"
    with pytest.raises(FileNotFoundError, match="detector.checkpoints.coco: file /nonexistent/bua.pth"):
        checkpoint_path(c, "coco")


def test_adaptive_mode_tops_up_to_min_regions(loaded, cfg):
    """Random weights: no region reaches confidence 0.2, so adaptive mode returns the 10 best (min_regions)."""
    model, _ = loaded
    c = copy.deepcopy(cfg)
    c["inference"].update({"num_regions": "adaptive", "min_regions": 10, "max_regions": 100})
    im = np.random.default_rng(2).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    x, s = preprocess(im, c)
    r = detect(model, [x], [s], [(128, 128)], c)[0]
    assert (r["object_conf"] < 0.2).all()
    assert r["features"].shape == (10, 2048) and r["boxes"].shape == (10, 4)


def test_checkpoint_anchors_replace_the_configured_ones(published, cfg, tmp_path):
    """As detectron2's checkpointer in the reference: a stored anchor buffer is loaded (a mis-shaped one is
    named); without it the configured caffe anchors stay."""
    _, state = published
    key = "proposal_generator.anchor_generator.cell_anchors.0"
    model, _ = load_detector(str(_write(tmp_path, state, "no_anchors.pth")), cfg)
    base = model.rpn.anchor_generator.base
    assert base[0].tolist() == [-38, -16, 53, 31] and base.shape == (12, 4)  # caffe's generate_anchors
    mine = dict(state)
    mine[key] = (np.arange(48, dtype=np.float32).reshape(12, 4) - 20)
    model, _ = load_detector(str(_write(tmp_path, mine, "anchors.pth")), cfg)
    np.testing.assert_array_equal(model.rpn.anchor_generator.base.numpy(), mine[key])
    mine[key] = np.zeros((9, 4), np.float32)
    with pytest.raises(CheckpointError, match=rf"{key}: checkpoint \(9, 4\) vs model \(12, 4\)"):
        load_detector(str(_write(tmp_path, mine, "bad_anchors.pth")), cfg)
