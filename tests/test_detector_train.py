"""Detector training on shapes: the loss goes down, training resumes after an interruption, the outputs
(model.pt loadable through the public API, metrics.json) are written; tag accuracy of the trained detector."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from itmatch.config import load_config
from itmatch.features.detector import detect, detector_config, load_detector, preprocess
from itmatch.features.detector import train as train_mod
from itmatch.features.detector.inference import batch_images
from tests.conftest import REPO, TEST_CONFIG


def images_table(root: Path) -> Path:
    """images.parquet for a generated shapes folder (what ingest writes; enough for the detector)."""
    payload = json.loads((root / "dataset_shapes.json").read_text())
    rows = [{"image_id": e["cocoid"], "split": e["split"], "file": f"{e['filepath']}/{e['filename']}",
             "width": e["width"], "height": e["height"]} for e in payload["images"]]
    path = root / "images.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def cfg() -> dict:
    c = load_config(REPO / "config" / "config.yaml", [TEST_CONFIG])
    return detector_config(c["detector"], "shapes")


@pytest.fixture
def one_thread():
    """One intra-op thread, as training uses (the small model is overhead-bound; see train.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_reduces_the_loss(tiny_shapes, cfg, one_thread):
    torch.manual_seed(0)
    data = train_mod.load_box_data(tiny_shapes / "dataset_shapes.json", tiny_shapes / "images",
                                   images_table(tiny_shapes), "train", 8)
    model = train_mod.build_model({**cfg["architecture"], "num_object_classes": 7, "num_attribute_classes": 9})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pre = [preprocess(im, cfg) for im in data.images]
    batch, hw = batch_images([p[0] for p in pre], "cpu")
    gts = [train_mod._gt_tensors(g, None, p[1]) for g, p in zip(data.gts, pre, strict=True)]
    tcfg = {**cfg["training"], "roi_batch_per_image": 16}
    totals = []
    model.train()
    for _ in range(25):
        losses = train_mod.training_step(model, batch, hw, gts, tcfg)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(float(loss.detach()))
    assert set(losses) == {"rpn_cls", "rpn_box", "cls", "box", "attr"}
    assert np.mean(totals[-5:]) < 0.7 * np.mean(totals[:5]), totals


def test_train_resume_and_outputs(tiny_shapes, cfg, tmp_path, monkeypatch, caplog):
    table = images_table(tiny_shapes)
    c = {**cfg, "training": {**cfg["training"], "epochs": 2, "max_images": 8, "batch_size": 4}}
    out = tmp_path / "detector"
    real_evaluate = train_mod.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("stopped after the last epoch")

    monkeypatch.setattr(train_mod, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train_detector(tiny_shapes / "dataset_shapes.json", tiny_shapes / "images", table,
                                 out / "model.pt", out / "metrics.json", c)
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["epoch"] == 2 and not (out / "model.pt").exists()
    monkeypatch.setattr(train_mod, "evaluate", real_evaluate)
    with caplog.at_level(logging.INFO, logger="itmatch"):
        metrics = train_mod.train_detector(tiny_shapes / "dataset_shapes.json", tiny_shapes / "images", table,
                                           out / "model.pt", out / "metrics.json", c)
    assert "resuming after epoch 2" in caplog.text
    assert not (out / "train_state.pt").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert 0 <= saved["object_map"] <= 1 and 0 <= saved["attribute_map"] <= 1
    assert len(saved["history"]) == 2 and saved == json.loads(json.dumps({"dataset_split": "val", **metrics}))
    model, meta = load_detector(str(out / "model.pt"), c)
    assert meta["object_names"] == ["circle", "square", "triangle", "star", "diamond", "hexagon"]
    assert meta["feature_dim"] == 256 and len(meta["weights_sha256"]) == 64
    im = np.zeros((96, 96, 3), np.uint8)
    x, s = preprocess(im, c)
    r = detect(model, [x], [s], [(96, 96)], c)[0]
    assert r["features"].shape[1] == 256 and r["boxes"].dtype == np.float32


def test_own_checkpoint_rejects_other_input_normalisation(tmp_path, cfg):
    from itmatch.features.detector.checkpoint import save_own

    model = train_mod.build_model({**cfg["architecture"], "num_object_classes": 3, "num_attribute_classes": 3})
    save_own(tmp_path / "m.pt", model, {**cfg["input"], "format": "RGB"}, ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="detector.input"):
        load_detector(str(tmp_path / "m.pt"), cfg)


TRAINED = REPO / "results" / "detector" / "shapes" / "model.pt"


@pytest.mark.skipif(not TRAINED.exists(), reason="needs the workflow's trained detector "
                    "(snakemake results/detector/shapes/model.pt)")
def test_region_tags_of_the_trained_detector(one_thread):
    """Rate at which the top regions' tags (shape + colour) are true of shapes test images.

    For an image with m objects the top m regions are checked; measured with the default config
    (3000 train images, 6 epochs): see docs/extraction.md "Region detector". Asserts ≥ 0.7 (shape) and ≥ 0.6
    (shape+colour)."""
    from itmatch.features.detector.evaluate import tag_accuracy

    c = detector_config(load_config(REPO / "config" / "config.yaml")["detector"], "shapes")
    root = REPO / "resources" / "shapes"
    data = train_mod.load_box_data(root / "dataset_shapes.json", root / "images",
                                   REPO / "results" / "data" / "shapes" / "images.parquet", "test", 200)
    model, _ = load_detector(str(TRAINED), c)
    load, n = train_mod.batch_loader(data, c, 16)
    rates = tag_accuracy(model, c, load, n, data.gts)
    print(f"region tags on {rates['n_images']} test images: shape right {rates['object']:.3f}, "
          f"shape+colour right {rates['object_colour']:.3f} (top region: {rates['top1_object_colour']:.3f})")
    assert rates["object"] >= 0.7 and rates["object_colour"] >= 0.6
