"""The seeded stand-in for the published bottom-up-attention checkpoint: layout, determinism, loadability."""

from __future__ import annotations

import pytest
import torch
import yaml

from itmatch.features.detector import detector_config, load_detector
from itmatch.features.detector.seeded import (
    CAFFE_ANCHORS,
    EXPECTED_KEYS,
    seeded_state_dict,
    state_dict_sha256,
    write_seeded_checkpoint,
)
from tests.conftest import REPO

# Recorded once from seeded_state_dict(0); equal on every machine (CPU torch.Generator, exact float32 arithmetic).
SEED0_SHA256 = "23f39d8954adae4297875b2b76895d68652d4709cfd2bdcf959e0a65214afadd"


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return seeded_state_dict(0)


def test_seed0_is_bit_identical(state):
    assert state_dict_sha256(state) == SEED0_SHA256


def test_layout_matches_reference_model(state):
    # 616 entries = len(state_dict()) of the reference model (test-caffe-r101-fix36.yaml), in its order.
    assert len(state) == EXPECTED_KEYS == 616
    keys = list(state)
    assert keys[0] == "backbone.stem.conv1.weight"
    assert keys[-1] == "roi_heads.box_predictor.attr_linear2.bias"
    assert sum(k.endswith("num_batches_tracked") for k in keys) == 80  # res4 (23 blocks) + res5 (3): nn.BatchNorm2d
    assert not any(k.startswith(("backbone.stem", "backbone.res2", "backbone.res3")) and "num_batches" in k
                   for k in keys)  # FrozenBatchNorm2d (FREEZE_AT 3) has no counter
    shapes = {
        "backbone.stem.conv1.weight": (64, 3, 7, 7),
        "backbone.res4.22.conv3.weight": (1024, 256, 1, 1),
        "roi_heads.res5.0.shortcut.weight": (2048, 1024, 1, 1),
        "roi_heads.res5.2.conv2.weight": (512, 512, 3, 3),
        "proposal_generator.rpn_head.conv.weight": (512, 1024, 3, 3),
        "proposal_generator.rpn_head.objectness_logits.weight": (24, 512, 1, 1),
        "proposal_generator.rpn_head.anchor_deltas.weight": (48, 512, 1, 1),
        "roi_heads.box_predictor.cls_score.weight": (1601, 2048),
        "roi_heads.box_predictor.bbox_pred.weight": (6404, 2048),
        "roi_heads.box_predictor.cls_embed.weight": (1601, 256),
        "roi_heads.box_predictor.attr_linear1.weight": (512, 2304),
        "roi_heads.box_predictor.attr_linear2.weight": (401, 512),
    }
    for k, shape in shapes.items():
        assert tuple(state[k].shape) == shape, k
        assert state[k].dtype == torch.float32, k
    assert state["roi_heads.res5.0.conv1.norm.num_batches_tracked"].dtype == torch.int64
    # float values in the reference model's state_dict (parameters, BN/FrozenBN buffers, anchors)
    assert sum(v.numel() for v in state.values() if v.is_floating_point()) == 65_559_566
    anchors = state["proposal_generator.anchor_generator.cell_anchors.0"]
    assert anchors.tolist() == [[float(c) for c in row] for row in CAFFE_ANCHORS]
    assert anchors[4].tolist() == [-24.0, -24.0, 39.0, 39.0]  # ratio 1, scale 4: 64 px square centred at 7.5


def test_values_are_in_a_sane_range(state):
    w = state["backbone.res4.0.conv2.weight"]
    assert abs(float(w.std()) - (2.0 / (256 * 9)) ** 0.5) < 2e-3  # He: std sqrt(2 / fan_in)
    assert float(state["backbone.res4.0.conv3.norm.weight"].max()) < 0.25  # last BN of a bottleneck: small
    assert 0.8 <= float(state["backbone.res4.0.conv2.norm.running_var"].min())
    assert all(torch.isfinite(v).all() for v in state.values())


def test_written_checkpoint_loads_into_our_detector(state, tmp_path):
    path = write_seeded_checkpoint(tmp_path / "seeded.pth", seed=0)
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert list(stored) == ["model"]  # the layout detectron2's DetectionCheckpointer reads
    assert state_dict_sha256(stored["model"]) == SEED0_SHA256
    with open(REPO / "config" / "config.yaml") as fh:
        cfg = detector_config(yaml.safe_load(fh)["detector"])
    model, meta = load_detector(str(path), cfg)
    assert meta["feature_dim"] == 2048
    assert len(meta["object_names"]) == 1600 and len(meta["attribute_names"]) == 400
