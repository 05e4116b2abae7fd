"""`itmatch export`: SCAN/PFAN .npy, MILVLG .npz and BUTD TSV, each read back by our own importers to the same
arrays; bad input refused with nothing written."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from itmatch import cli
from itmatch.features import exporters as ex
from itmatch.features import importers as im
from itmatch.features.blocks import write_blocks
from itmatch.features.regions_io import DATASETS, RegionsMeta, create_regions, open_regions, pad_regions, write_rows

R, D, K, L = 5, 8, 4, 3
OBJECTS, ATTRIBUTES = ["circle", "square", "triangle"], ["red", "blue"]


def _layout(root: Path, boxes_missing: bool = False) -> dict[str, Path]:
    """results/{data,features}/toy/ with 9 images in interleaved splits (so a split's rows are scattered),
    3–5 regions each, tags, 5 captions per image, and a blocks.h5."""
    rng = np.random.default_rng(1)
    splits = ["train", "test", "train", "val", "train", "test", "val", "train", "train"]
    data, feats = root / "results" / "data" / "toy", root / "results" / "features" / "toy"
    data.mkdir(parents=True)
    feats.mkdir(parents=True)
    images = pd.DataFrame({"image_id": [1000 + 3 * i for i in range(len(splits))], "split": splits,
                           "file": [f"{s}/toy_{i:05d}.png" for i, s in enumerate(splits)],
                           "width": 64, "height": 48})
    images.to_parquet(data / "images.parquet")
    caps = []
    for split in ("train", "val", "test"):  # within a split, captions 5i..5i+4 belong to its image i
        for iid in images.loc[images.split == split, "image_id"]:
            caps += [{"caption_id": len(caps), "image_id": iid, "split": split,
                      "text": f"shape {k} of\nimage  {iid}"} for k in range(5)]
    pd.DataFrame(caps).to_parquet(data / "captions.parquet")
    meta = RegionsMeta("toy", "0" * 64, D, OBJECTS, ATTRIBUTES, boxes_missing=boxes_missing)
    rows = []
    for _ in range(len(images)):
        n = int(rng.integers(3, R + 1))
        x1, y1 = rng.uniform(0, 30, n), rng.uniform(0, 20, n)
        det = {"features": rng.standard_normal((n, D)).astype(np.float32),
               "boxes": np.full((n, 4), np.nan, np.float32) if boxes_missing else
               np.stack([x1, y1, x1 + 20, y1 + 15], 1).astype(np.float32),
               "object_id": rng.integers(0, 3, n), "object_conf": rng.uniform(0, 1, n),
               "attribute_id": rng.integers(0, 2, n), "attribute_conf": rng.uniform(0, 1, n)}
        rows.append(pad_regions(det, R, (48, 64)))
    with create_regions(feats / "regions.h5", len(images), R, meta, images.image_id.to_numpy()) as f:
        write_rows(f, 0, rows)
    index = rng.integers(0, K * K, (len(images), R, L)).astype(np.int16)
    index[:, :, -1] = K * K  # padding, weight 0
    w = rng.uniform(0.1, 1, (len(images), R, L)).astype(np.float32)
    w[:, :, -1] = 0
    write_blocks(feats / "blocks.h5", images.image_id.to_numpy(), index, (w / w.sum(-1, keepdims=True)), K, L)
    return {"regions": feats / "regions.h5", "blocks": feats / "blocks.h5", "images": data / "images.parquet",
            "captions": data / "captions.parquet"}


@pytest.fixture()
def toy(tmp_path) -> dict[str, Path]:
    return _layout(tmp_path)


def _export(paths: dict[str, Path], fmt: str, out: Path, *extra: str) -> None:
    assert cli.main(["export", str(paths["regions"]), "--format", fmt, "--out", str(out), "--block", "2",
                     *extra]) == 0


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with open_regions(path) as reg:
        return {k: reg[k][:] for k in DATASETS} | {"names": (reg.meta.object_names, reg.meta.attribute_names)}


def _assert_same(a: dict, b: dict, keys=DATASETS) -> None:
    for k in keys:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert a[k].dtype == b[k].dtype, k


def test_scan_precomp_round_trip(toy, tmp_path):
    out = tmp_path / "scan"
    _export(toy, "scan-precomp", out)
    names = {"train": "train", "val": "dev", "test": "test"}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}_{k}" for s in names.values() for k in ("ims.npy", "caps.txt", "ids.txt", "boxes.npy")]
        + ["objects_vocab.txt", "attributes_vocab.txt"])
    t = pd.read_parquet(toy["images"])
    caps = pd.read_parquet(toy["captions"])
    orig = _arrays(toy["regions"])
    for split, name in names.items():
        rows = np.flatnonzero(t.split == split)
        ims = np.load(out / f"{name}_ims.npy")
        assert ims.dtype == np.float32 and ims.shape == (len(rows), R, D)
        np.testing.assert_array_equal(ims, orig["features"][rows].astype(np.float32))
        lines = (out / f"{name}_caps.txt").read_text().splitlines()
        assert len(lines) == 5 * len(rows)  # 5 per image, image order, whitespace folded
        assert lines == [" ".join(s.split()) for s in caps.loc[caps.split == split, "text"]]
        assert lines[5] == f"shape 0 of image {t.image_id[rows[1]]}"
        assert [int(x) for x in (out / f"{name}_ids.txt").read_text().split()] == t.image_id[rows].tolist()
        assert np.load(out / f"{name}_boxes.npy").shape == (len(rows), R, 2 * L)

    # our SCAN importer reads the features back identically (boxes are unknown in that layout)
    spec = {n: {"features": str(out / f"{n}_ims.npy"), "ids": str(out / f"{n}_ids.txt")} for n in names.values()}
    im.import_scan_npy(spec, toy["images"], tmp_path / "back.h5", tmp_path / "back.parquet")
    back = _arrays(tmp_path / "back.h5")
    _assert_same(orig, back, ("image_id", "features", "image_hw"))
    # ... also without the ids files (rows in images.parquet's split order)
    im.import_scan_npy({n: {"features": s["features"]} for n, s in spec.items()}, toy["images"],
                       tmp_path / "back2.h5", tmp_path / "back2.parquet")
    _assert_same(orig, _arrays(tmp_path / "back2.h5"), ("image_id", "features"))

    # and PFAN's importer the blocks: indices identical, weights within 2 float32 ulp (it renormalises them)
    im.import_pfan_boxes({n: {"boxes": str(out / f"{n}_boxes.npy"), "ids": str(out / f"{n}_ids.txt")}
                          for n in names.values()}, toy["images"], tmp_path / "blocks.h5", K)
    with h5py.File(toy["blocks"]) as a, h5py.File(tmp_path / "blocks.h5") as b:
        np.testing.assert_array_equal(a["index"][:], b["index"][:])
        np.testing.assert_array_max_ulp(a["weight"][:], b["weight"][:], maxulp=2)
        assert b.attrs["L"] == L


@pytest.mark.parametrize("npz_name", ["stem", "image_id"])
def test_npz_round_trip(toy, tmp_path, npz_name):
    out = tmp_path / "npz"
    _export(toy, "npz", out, "--npz-name", npz_name)
    t = pd.read_parquet(toy["images"])
    stems = [Path(f).stem for f in t.file] if npz_name == "stem" else [str(i) for i in t.image_id]
    assert sorted(p.name for p in out.glob("*.npz")) == sorted(f"{s}.npz" for s in stems)
    orig = _arrays(toy["regions"])
    with np.load(out / f"{stems[2]}.npz", allow_pickle=True) as z:  # MILVLG's keys (extract_utils.py:111)
        assert {"x", "bbox", "num_bbox", "image_h", "image_w", "info"} <= set(z.files)
        n = int(orig["num_regions"][2])
        assert z["x"].dtype == np.float32 and z["x"].shape == (n, D) and int(z["num_bbox"]) == n
        assert (int(z["image_h"]), int(z["image_w"])) == (48, 64)
        info = z["info"].item()
        assert info["image_id"] == stems[2] and info["num_boxes"] == n
        np.testing.assert_array_equal(info["objects_id"], orig["object_id"][2, :n])
        np.testing.assert_array_equal(info["attrs_conf"], orig["attribute_conf"][2, :n].astype(np.float32))
    im.import_npz(out, toy["images"], tmp_path / "back.h5", tmp_path / "back.parquet", max_regions=R,
                  object_names=im.read_names(out / "objects_vocab.txt"),
                  attribute_names=im.read_names(out / "attributes_vocab.txt"))
    back = _arrays(tmp_path / "back.h5")
    _assert_same(orig, back)
    assert back["names"] == (OBJECTS, ATTRIBUTES)


@pytest.mark.parametrize("tags", [False, True])
def test_tsv_round_trip(toy, tmp_path, tags):
    out = tmp_path / "tsv"
    _export(toy, "tsv", out, *(["--tsv-tags"] if tags else []))
    with open(out / "regions.tsv", newline="") as fh:  # generate_tsv.py's FIELDNAMES (+ the forks' four tags)
        rows = list(csv.reader(fh, delimiter="\t"))
    assert len(rows) == 9 and {len(r) for r in rows} == {10 if tags else 6}
    orig = _arrays(toy["regions"])
    assert [int(r[0]) for r in rows] == orig["image_id"].tolist()
    assert rows[0][1:4] == ["64", "48", str(orig["num_regions"][0])]  # image_w, image_h, num_boxes
    im.import_tsv([out / "regions.tsv"], toy["images"], tmp_path / "back.h5", tmp_path / "back.parquet",
                  max_regions=R, object_names=im.read_names(out / "objects_vocab.txt"),
                  attribute_names=im.read_names(out / "attributes_vocab.txt"))
    back = _arrays(tmp_path / "back.h5")
    _assert_same(orig, back, ("image_id", "features", "boxes", "image_hw", "num_regions"))
    if tags:
        _assert_same(orig, back)
    else:
        assert (back["object_id"] == -1).all() and not back["object_conf"].any()


def test_cli_choices_match_and_unknown_format_lists_them(toy, tmp_path, capsys):
    assert cli.EXPORT_FORMATS == ex.FORMATS
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(toy["regions"]), "--format", "parquet", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'parquet'" in err and all(f"'{f}'" in err for f in ex.FORMATS)
    with pytest.raises(ex.ExportError, match="unknown export format 'h5'; choose one of scan-precomp, npz, tsv"):
        ex.export_features(toy["regions"], "h5", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _no_leftovers(folder: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name], list(folder.iterdir())


def test_bad_captions_leave_nothing(toy, tmp_path, capsys):
    caps = pd.read_parquet(toy["captions"])
    caps.drop(index=7).to_parquet(toy["captions"])  # the second train image now has 4 captions
    out = tmp_path / "scan"
    assert cli.main(["export", str(toy["regions"]), "--format", "scan-precomp", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(toy["captions"]) in err and "exactly 5 captions per image" in err and "image 1006 has 4" in err
    _no_leftovers(tmp_path, out)


def test_failure_mid_write_leaves_nothing(toy, tmp_path, monkeypatch):
    out = tmp_path / "npz"
    real, calls = np.savez_compressed, []

    def fail_on_fourth(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise OSError("disk full")
        real(*a, **k)

    monkeypatch.setattr(ex.np, "savez_compressed", fail_on_fourth)
    with pytest.raises(OSError, match="disk full"):
        ex.export_features(toy["regions"], "npz", out, block=2)
    _no_leftovers(tmp_path, out)


def test_refusals(tmp_path, toy):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ex.ExportError, match="not empty; choose another --out or pass --overwrite"):
        ex.export_features(toy["regions"], "tsv", out)
    assert (out / "keep.txt").read_text() == "mine"
    ex.export_features(toy["regions"], "tsv", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["attributes_vocab.txt", "objects_vocab.txt", "regions.tsv"]

    other = tmp_path / "other"
    other.mkdir()
    noboxes = _layout(other, boxes_missing=True)
    for fmt in ("npz", "tsv"):
        with pytest.raises(ex.RegionsError, match=f"the {fmt} export needs region boxes"):
            ex.export_features(noboxes["regions"], fmt, other / fmt)
        _no_leftovers(other, other / fmt)
    ex.export_features(noboxes["regions"], "scan-precomp", other / "scan")  # features only: fine
    assert (other / "scan" / "train_ims.npy").exists()

    t = pd.read_parquet(toy["images"])
    t.iloc[::-1].to_parquet(tmp_path / "shuffled.parquet")
    with pytest.raises(ex.ExportError, match="not those of .*regions.h5 .* in the same order"):
        ex.export_features(toy["regions"], "scan-precomp", tmp_path / "s", images=tmp_path / "shuffled.parquet")
    with pytest.raises(FileNotFoundError, match="nope.h5: regions file not found"):
        ex.export_features(tmp_path / "nope.h5", "tsv", tmp_path / "t")


def test_scan_precomp_of_ingested_shapes(tmp_path, tiny_shapes):
    """With images.parquet / captions.parquet as ingest writes them (the caption order SCAN needs is the
    contract's, not an accident of the toy fixture above)."""
    from itmatch.data.ingest import IngestOptions, ingest

    data, feats = tmp_path / "results" / "data" / "shapes", tmp_path / "results" / "features" / "shapes"
    feats.mkdir(parents=True)
    ingest(tiny_shapes / "dataset_shapes.json", tiny_shapes / "images", data / "images.parquet",
           data / "captions.parquet", IngestOptions())
    t = pd.read_parquet(data / "images.parquet")
    rng = np.random.default_rng(0)
    with create_regions(feats / "regions.h5", len(t), R, RegionsMeta("toy", "0", D), t.image_id.to_numpy()) as f:
        write_rows(f, 0, [pad_regions({"features": rng.standard_normal((R, D))}, R, (96, 96)) for _ in range(len(t))])
    out = tmp_path / "D"
    assert cli.main(["export", str(feats / "regions.h5"), "--format", "scan-precomp", "--out", str(out)]) == 0
    caps = pd.read_parquet(data / "captions.parquet")
    for split, name in (("train", "train"), ("val", "dev"), ("test", "test")):
        ids = [int(x) for x in (out / f"{name}_ids.txt").read_text().split()]
        assert ids == t.loc[t.split == split, "image_id"].tolist()
        lines = (out / f"{name}_caps.txt").read_text().splitlines()
        by_image = caps[caps.split == split].groupby("image_id", sort=False)["text"].apply(list)
        assert lines == [" ".join(c.split()) for i in ids for c in by_image[i]]
    spec = {n: {"features": str(out / f"{n}_ims.npy")} for n in ("train", "dev", "test")}
    im.import_scan_npy(spec, data / "images.parquet", tmp_path / "b.h5", tmp_path / "b.parquet")
    _assert_same(_arrays(feats / "regions.h5"), _arrays(tmp_path / "b.h5"), ("image_id", "features"))
