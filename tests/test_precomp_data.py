"""The precomp dataset kind's readers (itmatch.data.precomp): a folder made from the committed real captions."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from itmatch.data.precomp import (
    PrecompError,
    default_splits,
    ingest_precomp_folder,
    precomp_import_spec,
    precomp_paths,
    read_caption_lines,
    resolve_precomp,
)
from itmatch.features.importers import import_pfan_boxes, run_import
from tests.precomp_folder import CAPTIONS, FIRST_IMAGE_ID, FIX, make_precomp_folder

D = 64  # small features for the unit tests (the end-to-end test uses 36 × 2048)


@pytest.fixture
def folder(tmp_path):
    return make_precomp_folder(tmp_path / "f30k_precomp", dim=D)


def _ingest(folder, tmp_path, **kw):
    return ingest_precomp_folder(folder, kw.pop("splits", None), kw.pop("boxes", "auto"), tmp_path / "images.parquet",
                                 tmp_path / "captions.parquet", key="datasets.mine")


def test_tables_follow_the_files(folder, tmp_path):
    res = _ingest(folder, tmp_path)
    assert {k: (s.prefix, s.n_images, s.rows_per_image) for k, s in res.items()} == {
        "train": ("train", 140, 1), "val": ("dev", 30, 5), "test": ("test", 30, 1)}
    img = pd.read_parquet(tmp_path / "images.parquet")
    cap = pd.read_parquet(tmp_path / "captions.parquet")
    assert img["split"].value_counts().to_dict() == {"train": 140, "val": 30, "test": 30}
    assert img["image_id"].tolist() == list(range(FIRST_IMAGE_ID, FIRST_IMAGE_ID + 200))
    assert (img["width"] == 0).all() and (img["height"] == 0).all()
    # the real captions, in order; image i of a split <-> its lines 5i..5i+4
    assert cap["text"].tolist() == CAPTIONS.read_text(encoding="utf-8").splitlines()
    assert cap["caption_id"].tolist() == list(range(1000))
    assert (cap["image_id"].to_numpy() == np.repeat(img["image_id"].to_numpy(), 5)).all()
    assert (cap["split"].to_numpy() == np.repeat(img["split"].to_numpy(), 5)).all()


def test_without_ids_image_ids_are_row_numbers(tmp_path):
    f = make_precomp_folder(tmp_path / "p", dim=8, ids=False, boxes=False)
    _ingest(f, tmp_path)
    assert pd.read_parquet(tmp_path / "images.parquet")["image_id"].tolist() == list(range(200))


def test_testall_is_the_default_test_split(folder):
    assert default_splits(folder)["test"] == "test"
    for ext in ("caps.txt", "ims.npy"):
        (folder / f"testall_{ext}").write_bytes((folder / f"test_{ext}").read_bytes())
    assert default_splits(folder) == {"train": "train", "val": "dev", "test": "testall"}
    assert resolve_precomp(folder, boxes=False)["test"].prefix == "testall"
    assert resolve_precomp(folder, {"test": "test"})["test"].prefix == "test"


def test_regions_and_blocks_are_imported(folder, tmp_path):
    _ingest(folder, tmp_path)
    spec = precomp_import_spec(precomp_paths(folder))  # what rules import_regions / import_pfan_blocks run
    run_import(spec, tmp_path / "images.parquet", tmp_path / "regions.h5", tmp_path / "regions.parquet")
    with h5py.File(tmp_path / "regions.h5", "r") as f:
        feats = f["features"]
        assert feats.shape == (200, 36, D) and bool(f.attrs["boxes_missing"])
        train = np.load(folder / "train_ims.npy")
        dev = np.load(folder / "dev_ims.npy")  # one row per caption: image i is row 5i
        np.testing.assert_allclose(feats[0], train[0], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(feats[141], dev[5], rtol=1e-3, atol=1e-3)
        assert (f["num_regions"][:] == 36).all()
    import_pfan_boxes(spec["pfan_boxes"], tmp_path / "images.parquet", tmp_path / "blocks.h5", K=16)
    with h5py.File(tmp_path / "blocks.h5", "r") as f:
        boxes = np.load(folder / "test_boxes.npy")
        np.testing.assert_array_equal(f["index"][170], boxes[0, :, :15])
        np.testing.assert_allclose(f["weight"][170], boxes[0, :, 15:], rtol=1e-5)


def test_pfan_real_position_file(tmp_path):
    """PFAN's released layout (float64, padding 256, weights summing to 1) with its real captions."""
    f = make_precomp_folder(tmp_path / "p", splits=(("train", 4), ("dev", 2), ("test", 2)), dim=8, boxes=False)
    (f / "test_caps.txt").write_bytes((FIX / "pfan_dev_caps.txt").read_bytes())
    real = np.load(FIX / "pfan_dev_boxes.npy")
    np.save(f / "test_ims.npy", np.zeros((10, 36, 8), np.float32))
    for prefix, n in (("train", 4), ("dev", 2)):
        np.save(f / f"{prefix}_boxes.npy", real[:n])
    np.save(f / "test_boxes.npy", real)
    (f / "test_ids.txt").unlink()
    res = _ingest(f, tmp_path, boxes=True)
    assert res["test"].n_images == 10 and read_caption_lines(res["test"].caps)[0].startswith("A group of people")
    spec = precomp_import_spec(precomp_paths(f, boxes=True))
    import_pfan_boxes(spec["pfan_boxes"], tmp_path / "images.parquet", tmp_path / "blocks.h5", K=16)
    with h5py.File(tmp_path / "blocks.h5", "r") as h:
        idx, w = h["index"][-10:], h["weight"][-10:]
    np.testing.assert_array_equal(idx, real[..., :15].astype(np.int16))
    np.testing.assert_allclose(w, real[..., 15:], atol=1e-6)
    assert (idx == 256).any() and (w[idx == 256] == 0).all()


def _no_tables(tmp_path):
    return not (tmp_path / "images.parquet").exists() and not (tmp_path / "captions.parquet").exists()


@pytest.mark.parametrize("breakage, message", [
    (lambda f: (f / "test_caps.txt").write_text("one caption\n" * 149),
     "test_caps.txt: 149 captions, not 5 × the 30 images of test_ims.npy"),
    (lambda f: (f / "dev_ids.txt").write_text("1\n2\n"), "dev_ids.txt: 2 ids for 30 images"),
    (lambda f: np.save(f / "train_ims.npy", np.zeros((140, 36 * 8), np.float32)),
     "train_ims.npy: shape (140, 288) dtype float32; expected float [images, regions, dim]"),
    (lambda f: np.save(f / "train_ims.npy", np.zeros((140, 36, 8), np.int32)),
     "train_ims.npy: shape (140, 36, 8) dtype int32; expected float"),
    (lambda f: (f / "test_ims.npy").write_text("not numpy"), "test_ims.npy: not a readable .npy array"),
    (lambda f: np.save(f / "test_boxes.npy", np.zeros((30, 36, 29))), "test_boxes.npy: shape (30, 36, 29)"),
    (lambda f: np.save(f / "test_boxes.npy", np.zeros((31, 36, 30))), "does not match test_ims.npy (30 images"),
])
def test_bad_folder_is_named_and_writes_nothing(tmp_path, breakage, message):
    f = make_precomp_folder(tmp_path / "p", dim=8)
    breakage(f)
    with pytest.raises(PrecompError) as e:
        _ingest(f, tmp_path)
    assert message in str(e.value), str(e.value)
    assert _no_tables(tmp_path)


def test_bad_settings_are_named(tmp_path):
    f = make_precomp_folder(tmp_path / "p", dim=8, boxes=False)
    with pytest.raises(PrecompError, match=r"datasets.mine.splits.test: .*/p/testx_caps.txt does not exist"):
        _ingest(f, tmp_path, splits={"test": "testx"})
    with pytest.raises(PrecompError, match="datasets.mine.splits: unknown split.*dev; ours are train, val, test"):
        _ingest(f, tmp_path, splits={"dev": "dev"})
    with pytest.raises(PrecompError, match=r"train_boxes.npy not found \(datasets.mine.boxes: true"):
        _ingest(f, tmp_path, boxes=True)
    with pytest.raises(PrecompError, match="datasets.mine.folder: .* is not a folder"):
        _ingest(tmp_path / "nope", tmp_path)
    assert _no_tables(tmp_path)
    # boxes: auto with a position file for some splits only: none used (warned)
    np.save(f / "train_boxes.npy", np.zeros((140, 36, 30)))
    assert all(s.boxes is None for s in resolve_precomp(f).values())


def test_recipes_of_the_builtin_dataset_apply_first():
    """datasets.<name>.recipes: coco → COCO's model, training and evaluation overrides, then the dataset's own."""
    from itmatch.config import validate_config
    from itmatch.recipes import load_recipe_config, resolve
    from itmatch.training.settings import evaluation_settings

    cfg = load_recipe_config()
    cfg["datasets"]["coco_precomp"] = {"kind": "precomp", "folder": "data/coco_precomp", "recipes": "coco"}
    cfg["models"]["scan"]["datasets"]["coco_precomp"] = {"embed_dim": 64}
    validate_config(cfg)
    mine, coco = resolve(cfg, "scan", "coco_precomp"), resolve(cfg, "scan", "coco")
    assert mine["model"] == {**coco["model"], "embed_dim": 64}
    assert mine["training"] == coco["training"] and mine["sources"] == coco["sources"]
    assert evaluation_settings(cfg, "coco_precomp") == evaluation_settings(cfg, "coco")
    cfg["datasets"]["coco_precomp"]["recipes"] = None
    assert resolve(cfg, "scan", "coco_precomp")["model"]["t2i"] == cfg["models"]["scan"]["t2i"]
    assert evaluation_settings(cfg, "coco_precomp")["folds"] == 1
