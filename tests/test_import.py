"""Importers: bottom-up-attention TSV, per-image npz, SCAN npy (+ PFAN boxes npy → blocks.h5)."""

from __future__ import annotations

import base64
import csv
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from itmatch.features import importers as im
from itmatch.features.regions_io import DTYPES, BoxesMissingError, RegionsError, open_regions, require_boxes

D = 12


@pytest.fixture()
def dataset(tmp_path) -> tuple[Path, pd.DataFrame, dict]:
    """images.parquet with 3 train / 2 val / 2 test images and per-image ground truth to import."""
    rng = np.random.default_rng(0)
    rows, truth = [], {}
    splits = ["train"] * 3 + ["val"] * 2 + ["test"] * 2
    for i, split in enumerate(splits):
        iid = 500 + 7 * i
        h, w = int(rng.integers(50, 90)), int(rng.integers(50, 90))
        rows.append({"image_id": iid, "split": split, "file": f"{split}/img_{90000 + i}.jpg", "width": w,
                     "height": h})
        n = int(rng.integers(2, 6))
        x1 = rng.uniform(0, w / 2, n)
        y1 = rng.uniform(0, h / 2, n)
        truth[iid] = {"hw": (h, w), "stem": 90000 + i,
                      "features": rng.standard_normal((n, D)).astype(np.float32),
                      "boxes": np.stack([x1, y1, x1 + 10, y1 + 12], 1).astype(np.float32),
                      "object_id": rng.integers(0, 4, n), "object_conf": rng.uniform(0, 1, n).astype(np.float32),
                      "attribute_id": rng.integers(0, 3, n), "attribute_conf": rng.uniform(0, 1, n).astype(np.float32)}
    t = pd.DataFrame(rows)
    p = tmp_path / "images.parquet"
    t.to_parquet(p)
    return p, t, truth


def _check_regions(h5: Path, parquet: Path, t: pd.DataFrame, truth: dict, with_tags: bool) -> None:
    with open_regions(h5) as reg:
        for name, dt in DTYPES.items():
            assert reg[name].dtype == dt
        assert reg.n == len(t) and reg.d == D and reg.has_boxes
        np.testing.assert_array_equal(reg["image_id"][:], t.image_id.to_numpy())
        for i, iid in enumerate(t.image_id):
            g = truth[iid]
            n = len(g["boxes"])
            assert reg["num_regions"][i] == n
            np.testing.assert_array_equal(reg["image_hw"][i], g["hw"])
            np.testing.assert_allclose(reg["features"][i, :n], g["features"], rtol=1e-3, atol=1e-3)
            assert not reg["features"][i, n:].any()
            np.testing.assert_array_equal(reg["boxes"][i, :n], g["boxes"])
            if with_tags:
                np.testing.assert_array_equal(reg["object_id"][i, :n], g["object_id"])
                np.testing.assert_allclose(reg["attribute_conf"][i, :n], g["attribute_conf"], atol=1e-3)
    regs = pd.read_parquet(parquet)
    assert len(regs) == sum(len(g["boxes"]) for g in truth.values())
    if with_tags:
        iid = t.image_id[0]
        names = regs[regs.image_id == iid].sort_values("region").object.tolist()
        assert names == [["dog", "cat", "man", "tree"][k] for k in truth[iid]["object_id"]]


def _b64(a: np.ndarray, wrap: bool = False) -> str:
    s = base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()
    return f"b'{s}'" if wrap else s


@pytest.mark.parametrize("by", ["image_id", "file_stem"])
def test_import_tsv(dataset, tmp_path, by):
    p, t, truth = dataset
    vocab = tmp_path / "objects_vocab.txt"
    vocab.write_text("dog,dogs\ncat\nman,men\ntree\n")
    files = [tmp_path / "a.tsv", tmp_path / "b.tsv"]
    order = list(truth)[::-1]  # any order, over two files, plus an image not in images.parquet
    extra = {"hw": (10, 10), "stem": 1, "features": np.ones((2, D), np.float32), "boxes": np.ones((2, 4), np.float32)}
    for k, f in enumerate(files):
        with open(f, "w", newline="") as fh:
            w = csv.writer(fh, delimiter="\t")
            for iid in order[k::2] + ([12345] if k == 0 else []):
                g = truth.get(iid, extra)
                key = iid if by == "image_id" else g["stem"]
                w.writerow([key, g["hw"][1], g["hw"][0], len(g["boxes"]), _b64(g["boxes"], wrap=k == 1),
                            _b64(g["features"]), _b64(g.get("object_id", np.zeros(2, np.int64)).astype(np.int64)),
                            _b64(g.get("object_conf", np.zeros(2, np.float32))),
                            _b64(g.get("attribute_id", np.zeros(2, np.int64)).astype(np.int64)),
                            _b64(g.get("attribute_conf", np.zeros(2, np.float32)))])
    out, outp = tmp_path / "regions.h5", tmp_path / "regions.parquet"
    im.import_tsv(files, p, out, outp, max_regions=6, object_names=im.read_names(vocab),
                  attribute_names=["red", "big", "old"])
    _check_regions(out, outp, t, truth, with_tags=True)
    im.import_tsv(files, p, out, outp, max_regions=6)  # ids but no vocabulary: ids kept, names null
    with open_regions(out) as reg:
        np.testing.assert_array_equal(reg["object_id"][0, :len(truth[500]["object_id"])], truth[500]["object_id"])
    assert pd.read_parquet(outp).object.isna().all()


def test_import_tsv_six_fields_and_errors(dataset, tmp_path):
    p, t, truth = dataset
    f = tmp_path / "feat.tsv"
    lines = []
    for iid, g in truth.items():
        lines.append("\t".join(map(str, [iid, g["hw"][1], g["hw"][0], len(g["boxes"]), _b64(g["boxes"]),
                                          _b64(g["features"])])))
    f.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(im.FeatureImportError, match=r"1 of 7 images .* have no features, e\.g\. 542"):
        im.import_tsv([f], p, tmp_path / "r.h5", tmp_path / "r.parquet")
    assert not (tmp_path / "r.h5").exists()
    f.write_text("\n".join(lines) + "\n")
    im.import_tsv([f], p, tmp_path / "r.h5", tmp_path / "r.parquet")
    _check_regions(tmp_path / "r.h5", tmp_path / "r.parquet", t, truth, with_tags=False)
    with pytest.raises(RegionsError, match="more than the file's R=3"):
        im.import_tsv([f], p, tmp_path / "r2.h5", tmp_path / "r2.parquet", max_regions=3)
    f.write_text(lines[0].replace("\t", "\t!!", 1)[:-40] + "\n")
    with pytest.raises(im.FeatureImportError, match=r"feat.tsv:1: bad image_id"):
        im.import_tsv([f], p, tmp_path / "r3.h5", tmp_path / "r3.parquet")


def test_import_npz(dataset, tmp_path):
    p, t, truth = dataset
    folder = tmp_path / "npz"
    folder.mkdir()
    for k, (iid, g) in enumerate(truth.items()):
        name = f"img_{g['stem']}" if k % 2 else str(iid)  # both naming conventions
        x = g["features"] if k != 2 else g["features"].T  # one stored [D, n]
        np.savez_compressed(folder / f"{name}.npz", x=x, bbox=g["boxes"], num_bbox=len(g["boxes"]),
                            image_h=g["hw"][0], image_w=g["hw"][1], objects_id=g["object_id"],
                            objects_conf=g["object_conf"], attrs_id=g["attribute_id"], attrs_conf=g["attribute_conf"])
    out, outp = tmp_path / "regions.h5", tmp_path / "regions.parquet"
    im.import_npz(folder, p, out, outp, max_regions=8, object_names=["dog", "cat", "man", "tree"],
                  attribute_names=["a", "b", "c"])
    _check_regions(out, outp, t, truth, with_tags=True)
    (folder / f"{t.image_id[0]}.npz").unlink()
    with pytest.raises(im.FeatureImportError, match=r"no img_90000.npz or 500.npz"):
        im.import_npz(folder, p, out, outp)


def test_import_scan_npy_and_pfan_boxes(dataset, tmp_path):
    """SCAN features (boxes missing, marked) + PFAN blocks whose row order differs, re-aligned by image id."""
    p, t, _ = dataset
    rng = np.random.default_rng(1)
    R, K, L = 5, 4, 3
    feats = {iid: rng.standard_normal((R, D)).astype(np.float32) for iid in t.image_id}
    blocks = {iid: (rng.integers(0, K * K + 1, (R, L)), rng.uniform(0.1, 1, (R, L))) for iid in t.image_id}
    scan, pfan = {}, {}
    for split, scan_name in (("train", "train"), ("val", "dev"), ("test", "test")):
        ids = t.image_id[t.split == split].to_numpy()
        f = tmp_path / f"{scan_name}_ims.npy"
        arr = np.stack([feats[i] for i in ids])
        if split == "train":  # rkiros layout: every image repeated per caption
            arr = np.repeat(arr, 5, axis=0)
        np.save(f, arr)
        scan[scan_name] = {"features": str(f)}
        shuffled = rng.permutation(ids)
        b = tmp_path / f"{scan_name}_boxes.npy"
        np.save(b, np.stack([np.concatenate([blocks[i][0], blocks[i][1]], -1) for i in shuffled]).astype(np.float32))
        ids_file = tmp_path / f"{scan_name}_pfan_ids.txt"
        ids_file.write_text("".join(f"{i}\n" for i in shuffled))
        pfan[scan_name] = {"boxes": str(b), "ids": str(ids_file)}
    out, outp = tmp_path / "regions.h5", tmp_path / "regions.parquet"
    im.import_scan_npy(scan, p, out, outp, block=2)
    with open_regions(out) as reg:
        assert not reg.has_boxes and reg.r == R and reg.d == D
        for i, iid in enumerate(t.image_id):
            np.testing.assert_allclose(reg["features"][i], feats[iid], atol=1e-2, rtol=1e-3)
            np.testing.assert_array_equal(reg["image_hw"][i], [t.height[i], t.width[i]])
        assert (reg["num_regions"][:] == R).all() and np.isnan(reg["boxes"][:]).all()
    regs = pd.read_parquet(outp)
    assert len(regs) == len(t) * R and regs.x1.isna().all() and regs.object.isna().all()
    with pytest.raises(BoxesMissingError, match="imported without boxes"):
        require_boxes(out, "blocks")

    bl = tmp_path / "blocks.h5"
    im.import_pfan_boxes(pfan, p, bl, K=K)
    with h5py.File(bl, "r") as f:
        assert f.attrs["K"] == K and f.attrs["L"] == L
        assert f["index"].dtype == np.int16 and f["weight"].dtype == np.float32
        np.testing.assert_array_equal(f["image_id"][:], t.image_id.to_numpy())
        for i, iid in enumerate(t.image_id):
            idx, w = blocks[iid]
            np.testing.assert_array_equal(f["index"][i], idx)
            w = np.where(idx == K * K, 0, w)
            expect = w / np.where(w.sum(-1, keepdims=True) > 0, w.sum(-1, keepdims=True), 1)
            np.testing.assert_allclose(f["weight"][i], expect, rtol=1e-6)
    with pytest.raises(im.FeatureImportError, match="block index .* outside 0..4"):
        im.import_pfan_boxes(pfan, p, tmp_path / "b2.h5", K=2)


def test_scan_npy_row_count_mismatch_needs_ids(dataset, tmp_path):
    p, t, _ = dataset
    f = tmp_path / "test_ims.npy"
    np.save(f, np.zeros((3, 2, D), np.float32))
    with pytest.raises(im.FeatureImportError, match="3 rows but images.parquet has 2 test images"):
        im.import_scan_npy({"test": {"features": str(f)}}, p, tmp_path / "r.h5", tmp_path / "r.parquet")


@pytest.mark.parametrize("block", [1, 256])
def test_scan_npy_image_listed_twice_is_named(dataset, tmp_path, block):
    """The same image id twice (in one block or across blocks) stops the import naming its row."""
    p, t, _ = dataset
    test = t[t.split == "test"]
    f, ids = tmp_path / "test_ims.npy", tmp_path / "test_ids.txt"
    np.save(f, np.zeros((len(test), 2, D), np.float32))
    ids.write_text("".join(f"{test.image_id.iloc[0]}\n" for _ in range(len(test))))
    row = int(test.index[0])
    with pytest.raises(im.FeatureImportError, match=f"images.parquet row {row} imported twice"):
        im.import_scan_npy({"test": {"features": str(f), "ids": str(ids)}}, p, tmp_path / "r.h5",
                           tmp_path / "r.parquet", block=block)


def _npz_regions(dataset, tmp_path) -> tuple[Path, Path]:
    """The fixture's truth imported through npz → a contract regions.h5 (+ its parquet)."""
    p, t, truth = dataset
    folder = tmp_path / "npz"
    folder.mkdir()
    for iid, g in truth.items():
        np.savez(folder / f"{iid}.npz", x=g["features"], bbox=g["boxes"], image_h=g["hw"][0], image_w=g["hw"][1],
                 objects_id=g["object_id"], objects_conf=g["object_conf"], attrs_id=g["attribute_id"],
                 attrs_conf=g["attribute_conf"])
    out = tmp_path / "made_elsewhere.h5"
    im.import_npz(folder, p, out, tmp_path / "made_elsewhere.parquet", max_regions=8,
                  object_names=["dog", "cat", "man", "tree"], attribute_names=["a", "b", "c"])
    return p, out


@pytest.mark.parametrize("layout", ["same", "rechunked"])
def test_import_h5_realigns_rows_by_image_id(dataset, tmp_path, layout):
    """A regions.h5 made elsewhere, its rows in another order (plus one image unknown here), imports equal to the
    direct import: raw chunk copy when the storage matches, decoded copy when it does not."""
    p, t, truth = dataset
    _, made = _npz_regions(dataset, tmp_path)
    src = tmp_path / "shuffled.h5"
    perm = np.array([4, 0, 6, 2, 5, 1, 3])
    with h5py.File(made, "r") as f, h5py.File(src, "w") as g:
        for key, value in f.attrs.items():
            g.attrs[key] = value
        for name in f:
            v = f[name][:][perm]
            extra = np.zeros((1, *v.shape[1:]), v.dtype) + (9999 if name == "image_id" else 0)
            v = np.concatenate([v, extra])  # an image that is not in images.parquet: skipped
            chunks = f[name].chunks if layout == "same" else None
            g.create_dataset(name, data=v, chunks=chunks, fletcher32=layout == "same" and chunks is not None)
    out, outp = tmp_path / "regions.h5", tmp_path / "regions.parquet"
    im.run_import({"format": "h5", "file": str(src)}, p, out, outp)
    _check_regions(out, outp, t, truth, with_tags=True)
    with h5py.File(made, "r") as a, h5py.File(out, "r") as b:
        for name in a:
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_import_h5_missing_image_is_named(dataset, tmp_path):
    p, t, _ = dataset
    _, made = _npz_regions(dataset, tmp_path)
    src = tmp_path / "short.h5"
    with h5py.File(made, "r") as f, h5py.File(src, "w") as g:
        for key, value in f.attrs.items():
            g.attrs[key] = value
        for name in f:
            g.create_dataset(name, data=f[name][1:])
    with pytest.raises(im.FeatureImportError, match=r"short.h5: 1 of 7 images .* e\.g\. 500 \(train/img_90000.jpg\)"):
        im.run_import({"format": "h5", "file": str(src)}, p, tmp_path / "r.h5", tmp_path / "r.parquet")
    assert not (tmp_path / "r.h5").exists()
