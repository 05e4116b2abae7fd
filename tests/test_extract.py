"""Sharded, resumable extraction and streaming gather, against a small deterministic fake detector."""

from __future__ import annotations

import json
import sys
import tracemalloc
import types
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from itmatch.features import extract as ex
from itmatch.features.regions_io import (
    DTYPES,
    BoxesMissingError,
    RegionsError,
    open_regions,
    require_boxes,
)

D = 16
OBJECTS = ["circle", "square", "triangle"]
ATTRS = ["red", "blue"]


def _preprocess(image: np.ndarray, cfg: dict) -> tuple[torch.Tensor, float]:
    scale = cfg["inference"]["size"] / max(image.shape[:2])
    t = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    t = torch.nn.functional.interpolate(t[None], scale_factor=scale, mode="bilinear", align_corners=False)[0]
    return t, scale


def _detect(model, images, scales, orig_hw, cfg):
    out = []
    for img, s, (h, w) in zip(images, scales, orig_hw, strict=True):
        m = img.mean(dim=(1, 2))  # [3]
        n = 3 + int(m.sum().item() * 100) % 5
        k = torch.arange(n, dtype=torch.float32)[:, None]
        feats = (model(m)[None, :] * (k + 1)).numpy().astype(np.float32)  # [n, D]
        x1 = (k[:, 0] * 3 / s).numpy()
        boxes = np.stack([x1, x1, np.minimum(x1 + 20, w), np.minimum(x1 + 30, h)], 1).astype(np.float32)
        out.append({"features": feats, "boxes": boxes, "object_id": (np.arange(n) % 3),
                    "object_conf": np.linspace(0.9, 0.5, n), "attribute_id": np.arange(n) % 2,
                    "attribute_conf": np.full(n, 0.7)})
    return out


def _load(path, cfg, device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, D)
    return model, {"detector": "fake", "weights_sha256": "ab" * 32, "feature_dim": D,
                   "object_names": OBJECTS, "attribute_names": ATTRS}


FAKE = types.SimpleNamespace(load_detector=_load, preprocess=_preprocess, detect=_detect)
CFG = {"inference": {"size": 32}}


@pytest.fixture(scope="module")
def image_set(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(23):
        h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        rows.append({"image_id": 1000 + i, "split": "train", "file": f"im{i}.png", "width": w, "height": h})
    pq = root / "images.parquet"
    pd.DataFrame(rows).to_parquet(pq)
    return pq, root


def _opts(**kw) -> ex.ExtractOptions:
    return ex.ExtractOptions(**{"batch_size": 4, "workers": 0, "max_regions": 8, "device": "auto", "threads": 0,
                                "gather_block": 64, **kw})


def _content(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {"data": {k: f[k][()] for k in f}, "attrs": dict(f.attrs)}


def _assert_same(a: Path, b: Path) -> None:
    ca, cb = _content(a), _content(b)
    assert ca["data"].keys() == cb["data"].keys()
    for k in ca["data"]:
        np.testing.assert_array_equal(ca["data"][k], cb["data"][k], err_msg=k)
    assert ca["attrs"].keys() == cb["attrs"].keys()
    for k in ca["attrs"]:
        assert np.all(ca["attrs"][k] == cb["attrs"][k]), k


def test_shard_rows_cover_contiguously():
    for n in (0, 1, 7, 23, 100):
        for s in (1, 2, 3, 8):
            spans = [ex.shard_rows(n, i, s) for i in range(s)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(spans[i][1] == spans[i + 1][0] for i in range(s - 1))
    assert ex.parse_scatteritem("3-of-8") == (2, 8)
    with pytest.raises(ValueError, match="-of-"):
        ex.parse_scatteritem("3")


def test_extract_and_gather_contract(image_set, tmp_path):
    pq, root = image_set
    shards = [ex.extract_shard(pq, root, tmp_path / f"{i + 1}-of-3.h5", i, 3, "unused", CFG,
                               _opts(workers=1 if i == 0 else 0), backend=FAKE) for i in range(3)]
    out_h5, out_pq = tmp_path / "regions.h5", tmp_path / "regions.parquet"
    ex.gather_shards(shards[::-1], pq, out_h5, out_pq, block=5)
    table = pd.read_parquet(pq)
    with open_regions(out_h5) as reg:
        assert (reg.n, reg.r, reg.d) == (23, 8, D)
        for name, dt in DTYPES.items():
            assert reg[name].dtype == dt, name
        assert reg["features"].chunks == (1, 8, D)
        np.testing.assert_array_equal(reg["image_id"][:], table["image_id"].to_numpy())
        np.testing.assert_array_equal(reg["image_hw"][:], table[["height", "width"]].to_numpy())
        a = reg.file.attrs
        assert a["detector"] == "fake" and a["feature_dim"] == D and a["weights_sha256"] == "ab" * 32
        assert json.loads(a["object_names"]) == OBJECTS and json.loads(a["attribute_names"]) == ATTRS
        assert reg.has_boxes
        nr = reg["num_regions"][:]
        assert nr.min() >= 3 and nr.max() <= 7
        feats = reg["features"][:]
        for i, k in enumerate(nr):  # padding rows are zero / -1
            assert not feats[i, k:].any() and (reg["object_id"][i, k:] == -1).all()
            assert feats[i, :k].any()
        boxes = reg["boxes"][:]
    require_boxes(out_h5, "blocks")  # no error
    # every valid region is one parquet row, with names
    regs = pd.read_parquet(out_pq)
    assert list(regs.columns) == ["image_id", "region", "x1", "y1", "x2", "y2", "object", "object_conf",
                                  "attribute", "attribute_conf"]
    assert len(regs) == nr.sum()
    first = regs[regs.image_id == 1000].sort_values("region")
    assert list(first.object) == [OBJECTS[k % 3] for k in range(nr[0])]
    assert list(first.attribute) == [ATTRS[k % 2] for k in range(nr[0])]
    np.testing.assert_allclose(first[["x1", "y1", "x2", "y2"]].to_numpy(), boxes[0, :nr[0]])
    # sharding and batch composition do not change anything: one shard, other batch size (fake is per image)
    single = ex.extract_shard(pq, root, tmp_path / "1-of-1.h5", 0, 1, "unused", CFG, _opts(batch_size=5),
                              backend=FAKE)
    ex.gather_shards([single], pq, tmp_path / "one.h5", tmp_path / "one.parquet")
    _assert_same(out_h5, tmp_path / "one.h5")


class _Stop(Exception):
    pass


def test_interrupted_shard_resumes_identically(image_set, tmp_path):
    pq, root = image_set
    ref = ex.extract_shard(pq, root, tmp_path / "ref" / "1-of-1.h5", 0, 1, "unused", CFG, _opts(), backend=FAKE)
    out = tmp_path / "run" / "1-of-1.h5"
    calls = []

    def stop_after_two(done: int) -> None:
        calls.append(done)
        if len(calls) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        ex.extract_shard(pq, root, out, 0, 1, "unused", CFG, _opts(), backend=FAKE, on_batch=stop_after_two)
    assert not out.exists() and ex.partial_path(out).exists()
    with h5py.File(ex.partial_path(out), "r") as f:
        assert f["done"][0] == 8
    resumed = []
    ex.extract_shard(pq, root, out, 0, 1, "unused", CFG, _opts(), backend=FAKE, on_batch=resumed.append)
    assert resumed == [12, 16, 20, 23]  # continued at row 8, did not redo the first two batches
    assert not ex.partial_path(out).exists()
    _assert_same(ref, out)


def test_killed_subprocess_resumes_identically(image_set, tmp_path):
    """A shard killed by SIGKILL mid-run (no cleanup at all) resumes to the same file."""
    import subprocess

    pq, root = image_set
    ref = ex.extract_shard(pq, root, tmp_path / "ref.h5", 0, 1, "unused", CFG, _opts(), backend=FAKE)
    out = tmp_path / "killed.h5"
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_extract import FAKE, CFG, _opts
from itmatch.features import extract as ex
def kill(done):
    if done >= 12:
        os.kill(os.getpid(), signal.SIGKILL)
ex.extract_shard({str(pq)!r}, {str(root)!r}, {str(out)!r}, 0, 1, "unused", CFG, _opts(), backend=FAKE, on_batch=kill)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()
    with h5py.File(ex.partial_path(out), "r") as f:
        assert f["done"][0] == 12
    ex.extract_shard(pq, root, out, 0, 1, "unused", CFG, _opts(), backend=FAKE)
    _assert_same(ref, out)


def test_partial_from_other_config_is_restarted(image_set, tmp_path):
    pq, root = image_set
    out = tmp_path / "1-of-1.h5"
    with pytest.raises(_Stop):
        ex.extract_shard(pq, root, out, 0, 1, "unused", CFG, _opts(), backend=FAKE,
                         on_batch=lambda d: (_ for _ in ()).throw(_Stop()))
    seen = []
    ex.extract_shard(pq, root, out, 0, 1, "unused", {"inference": {"size": 24}}, _opts(), backend=FAKE,
                     on_batch=seen.append)
    assert seen[0] == 4  # started over: the partial belonged to another detector config


def test_gather_streams_block_by_block(image_set, tmp_path):
    """Peak Python-side memory of the gather stays far below the size of all features."""
    from itmatch.features.regions_io import RegionsMeta, create_regions

    n, r, d = 400, 36, 256
    pq = tmp_path / "images.parquet"
    pd.DataFrame({"image_id": np.arange(n) + 5, "split": "train", "file": "x", "width": 10,
                  "height": 10}).to_parquet(pq)
    meta = RegionsMeta("fake", "00", d, ["a"], ["b"])
    rng = np.random.default_rng(1)
    shards = []
    for s in range(2):
        a, b = ex.shard_rows(n, s, 2)
        p = tmp_path / f"s{s}.h5"
        with create_regions(p, b - a, r, meta, image_ids=np.arange(a, b) + 5) as f:
            for i in range(b - a):
                f["features"][i] = rng.standard_normal((r, d)).astype(np.float16)
            f["num_regions"][:] = 2
            f["object_id"][:, :2] = 0
            f["attribute_id"][:, :2] = 0
            f.attrs.update({"row_start": a, "row_stop": b})
            f["done"] = np.array([b - a])
        shards.append(p)
    total = n * r * d * 2  # bytes of all features (7.4 MB)
    tracemalloc.start()
    ex.gather_shards(shards, pq, tmp_path / "g.h5", tmp_path / "g.parquet", block=8)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < total / 5, (peak, total)
    with h5py.File(tmp_path / "g.h5", "r") as g, h5py.File(shards[1], "r") as s1:
        np.testing.assert_array_equal(g["features"][200:], s1["features"][:])
    assert len(pd.read_parquet(tmp_path / "g.parquet")) == 2 * n


def test_gather_refuses_bad_shards(image_set, tmp_path):
    pq, root = image_set
    s1 = ex.extract_shard(pq, root, tmp_path / "1-of-2.h5", 0, 2, "unused", CFG, _opts(), backend=FAKE)
    with pytest.raises(RegionsError, match="cover 11 rows"):
        ex.gather_shards([s1], pq, tmp_path / "r.h5", tmp_path / "r.parquet")
    s2 = ex.extract_shard(pq, root, tmp_path / "2-of-2.h5", 1, 2, "unused", CFG, _opts(), backend=FAKE)
    with h5py.File(s2, "r+") as f:
        f.attrs["weights_sha256"] = "cd" * 32
    with pytest.raises(RegionsError, match="differ"):
        ex.gather_shards([s1, s2], pq, tmp_path / "r.h5", tmp_path / "r.parquet")
    assert not (tmp_path / "r.h5").exists()


def test_bad_image_names_the_file(image_set, tmp_path):
    pq, root = image_set
    bad = tmp_path / "images.parquet"
    t = pd.read_parquet(pq)
    t.loc[2, "file"] = "missing.png"
    t.to_parquet(bad)
    with pytest.raises(RegionsError, match="missing.png"):
        ex.extract_shard(bad, root, tmp_path / "x.h5", 0, 1, "unused", CFG, _opts(), backend=FAKE)


def test_undecodable_image_names_the_file_and_stops(image_set, tmp_path):
    """A file that is present but not an image stops the shard with an error naming it (never skipped): the
    shard is not renamed to its final name, so the gather cannot pick up a hole."""
    pq, root = image_set
    folder = tmp_path / "imgs"
    folder.mkdir()
    t = pd.read_parquet(pq).head(6)
    for f in t["file"]:
        (folder / f).write_bytes((root / f).read_bytes())
    (folder / t["file"].iat[3]).write_bytes(b"not an image, just bytes")
    t.to_parquet(tmp_path / "images.parquet")
    with pytest.raises(RegionsError, match=rf"{t['file'].iat[3]}: cannot decode image"):
        ex.extract_shard(tmp_path / "images.parquet", folder, tmp_path / "x.h5", 0, 1, "unused", CFG,
                         _opts(batch_size=2), backend=FAKE)
    assert not (tmp_path / "x.h5").exists()
    with pytest.raises(RegionsError, match="cannot decode image"):
        ex.load_image(folder / t["file"].iat[3])
    assert ex.load_image(folder / t["file"].iat[0]).shape[2] == 3


def test_load_image_is_opencv_rgb(image_set):
    """Decoded with OpenCV (as the reference), returned as RGB: the same pixels as PIL for a PNG."""
    pq, root = image_set
    f = root / pd.read_parquet(pq)["file"].iat[0]
    with Image.open(f) as im:
        np.testing.assert_array_equal(ex.load_image(f), np.asarray(im.convert("RGB")))


def test_require_boxes_refuses_missing_boxes(tmp_path):
    from itmatch.features.regions_io import RegionsMeta, create_regions

    p = tmp_path / "regions.h5"
    create_regions(p, 2, 4, RegionsMeta("scan-npy", "", 8, boxes_missing=True)).close()
    with open_regions(p) as reg:
        assert not reg.has_boxes
    with pytest.raises(BoxesMissingError, match=r"blocks needs region boxes.*imported without boxes"):
        require_boxes(p, "blocks")


def test_more_shards_than_images(image_set, tmp_path):
    pq, root = image_set
    t = pd.read_parquet(pq).head(3)
    small = tmp_path / "images.parquet"
    t.to_parquet(small)
    shards = [ex.extract_shard(small, root, tmp_path / f"{i + 1}-of-5.h5", i, 5, "unused", CFG, _opts(),
                               backend=FAKE) for i in range(5)]
    ex.gather_shards(shards, small, tmp_path / "r.h5", tmp_path / "r.parquet")
    with open_regions(tmp_path / "r.h5") as reg:
        assert reg.n == 3 and (reg["num_regions"][:] > 0).all()


def test_extraction_device_refuses_cuda_without_a_gpu(monkeypatch):
    import torch

    from itmatch.features.extract import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="extraction.device is 'cuda' but torch sees no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
