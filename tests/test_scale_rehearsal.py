"""The scale rehearsal's tools (benchmarks/scale): the COCO-shaped generator writes contract-valid data with gold
parses, its config validates, the report fits exponents."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from itmatch.config import deep_update, load_config, validate_config
from itmatch.features.regions_io import open_regions
from itmatch.text.trees import tree_nodes

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "scale"))
import make_dataset as md  # noqa: E402
import rehearse  # noqa: E402
import report  # noqa: E402


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("scale") / "data"
    return out, md.make_dataset(out, 0.0005, processes=1)


def test_generator_writes_coco_proportions_and_gold_parses(made):
    out, info = made
    assert (info["train"], info["val"], info["test"]) == (57, 2, 2) and info["captions"] == 5 * info["images"]
    data = json.loads((out / "dataset.json").read_text())
    images = data["images"]
    assert [im["split"] for im in images].count("test") == 2
    assert {im["split"] for im in images} == {"train", "restval", "val", "test"}  # restval: train in val2014
    assert len({im["cocoid"] for im in images}) == len(images)
    sentids = [s["sentid"] for im in images for s in im["sentences"]]
    assert sentids == list(range(len(sentids)))
    words = set()
    for im in images:
        assert len(im["sentences"]) == 5 and (out / "images" / im["filepath"] / im["filename"]).is_file()
        for s in im["sentences"]:
            nodes = tree_nodes(s["parse"], s["lemmas"])  # the gold parse reads as SMFEA's tree
            assert len(nodes) == 7
            assert s["raw"].lower().rstrip(".").replace(",", "").split() == s["tokens"]
            words.update(s["tokens"])
    assert not words & {"circle", "square", "triangle", "red", "blue"}  # shapes' nouns and colours replaced
    assert len(words) > 100


def test_generated_regions_follow_the_contract(made):
    out, info = made
    data = json.loads((out / "dataset.json").read_text())
    with open_regions(out / "regions.h5") as reg:
        assert (reg.n, reg.r, reg.d) == (info["images"], 36, 2048) and reg.has_boxes
        np.testing.assert_array_equal(reg["image_id"][:], [im["cocoid"] for im in data["images"]])
        boxes, hw = reg["boxes"][:], reg["image_hw"][:]
        assert (boxes[..., 0] >= 0).all() and (boxes[..., 2] > boxes[..., 0]).all()
        assert (boxes[..., 2] <= hw[:, None, 1]).all() and (boxes[..., 3] <= hw[:, None, 0]).all()
        assert (reg["num_regions"][:] == 36).all()
        feats = reg["features"][:4].astype(np.float32)
        assert np.isfinite(feats).all() and (feats >= 0).all() and feats.std() > 0.1
        obj, att = reg["object_id"][:].astype(int), reg["attribute_id"][:].astype(int)
        assert obj.max() < md.N_OBJECTS and att.max() < md.N_ATTRIBUTES
        # each object's attributes are among its own ATTRIBUTES_PER_OBJECT
        for o in np.unique(obj)[:20]:
            assert len(np.unique(att[obj == o])) <= md.ATTRIBUTES_PER_OBJECT
        assert len(reg.meta.object_names) == md.N_OBJECTS


def test_rehearsal_config_is_valid(made):
    out, _ = made
    cfg = deep_update(load_config(REPO / "config" / "config.yaml"), rehearse.run_config("scale0p05", out, 5, 64))
    validate_config(yaml.safe_load(yaml.safe_dump(cfg)))
    assert rehearse.dataset_name(0.01) == "scale1" and rehearse.dataset_name(1) == "scale100"
    assert rehearse.dataset_name(0.0005) == "scale0p05"


def test_report_exponent_and_table(tmp_path):
    assert report.exponent([1000, 10000, 100000], [2.0, 20.0, 200.0], 1.0) == pytest.approx(1.0)
    assert report.exponent([1000, 10000], [0.5, 40.0], 1.0) is None  # one size above the floor: no fit
    runs = [{"dataset": f"scale{p}", "images": 1233 * p, "captions": 6165 * p, "steps": 5, "batch_size": 128,
             "machine": {"cpus": 2, "memory_gb": 23.5},
             "stages": {"tokenize": {"seconds": 2.0 * p, "peak_mb": 200, "output_mb": 0.1 * p},
                        "evaluate scan": {"seconds": 3.0 * p * p, "peak_mb": 800, "output_mb": 0.5 * p * p}}}
            for p in (1, 10)]
    text, _ = report.table(runs, 1.0)
    assert "| tokenize | 2.0 / 200 / 0.1 | 20.0 / 200 / 1.0 | 1.00 | ≈ 200 (extrapolated) |" in text
    assert "| evaluate scan |" in text and "| 2.00 |" in text
    assert "≈ 29,994 (extrapolated, a + c·n²)" in text  # 3 s · (123,287 / 1,233)²
    # evaluation: fixed cost + images × captions; one size: all of it scaled quadratically (an upper bound)
    assert report.quadratic_full([1000, 10000], [11.0, 110.0]) == pytest.approx(10 + 1e-6 * 123287**2)
    assert report.quadratic_full([1000], [11.0]) == pytest.approx(11.0 * 123.287**2)
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\nkept\n\n<!-- scale:begin -->\nold\n<!-- scale:end -->\n\ntail\n")
    for p, r in zip((1, 10), runs, strict=True):
        (tmp_path / f"s{p}.json").write_text(json.dumps(r))
    sys.argv = ["report.py", str(tmp_path / "s1.json"), str(tmp_path / "s10.json"), "--doc", str(doc), "--plot",
                str(tmp_path / "p.png")]
    report.main()
    new = doc.read_text()
    assert "kept" in new and "tail" in new and "old" not in new and "| tokenize |" in new
    assert (tmp_path / "p.png").stat().st_size > 1000
