"""Import existing region features into the ``regions.h5`` / ``regions.parquet`` contract (and PFAN's
released block positions into ``blocks.h5``), instead of extracting them.

Formats:

- ``tsv``: the original bottom-up-attention TSV (tab-separated, no header; fields ``image_id, image_w,
  image_h, num_boxes, boxes, features`` with boxes/features base64 of float32 ``[num_boxes, 4|D]``;
  optionally four more fields ``objects_id, objects_conf, attrs_id, attrs_conf`` as written by some
  forks). Any number of files; rows in any order; Python-3 ``b'…'`` wrapped base64 is accepted.
- ``npz``: one ``.npz`` per image as written by the PyTorch re-implementations, named after the image
  file's stem or the image id; keys ``x`` [n,D], ``bbox`` [n,4], ``image_h``, ``image_w``,
  ``objects_id``, ``objects_conf``, ``attrs_id``, ``attrs_conf``. Files are read with
  ``allow_pickle=False`` (a pickle can run code): tags kept only inside a pickled ``info`` dict (older
  files) are not read — the import then has no object/attribute ids and says so in a warning naming the
  files; re-save them with top-level keys to keep the tags.
- ``scan_npy``: SCAN's ``{split}_ims.npy`` [n_split(×5), R, D] per split: features only, so the file is
  marked ``boxes_missing`` (boxes NaN, ids -1) and stages needing boxes refuse it. Rows map to the
  images of that split in ``images.parquet`` order, or to the ids listed in an optional ids file.
- PFAN's ``{split}_boxes.npy``: per image and region the L block indices and their weights (last axis
  ``2L``: L indices then L weights; or ``[..., L, 2]`` pairs) → ``blocks.h5`` directly. Its row order
  differs from SCAN's features, so an ids file per split gives each row's image id; rows are re-aligned
  to ``images.parquet`` by id. Weights are renormalised to sum 1 per region (padding, index K², weight 0).
- ``h5``: a ``regions.h5`` of this contract made elsewhere (another checkout, a colleague's extraction, the
  scale rehearsal's generator): layout checked, rows re-aligned to ``images.parquet`` by ``image_id``, the
  feature chunks copied raw (no decode, checksums kept) when both files store one image per chunk with the
  same filters; ``regions.parquet`` is written anew from it.

Image ids are matched to ``images.parquet``'s ``image_id`` or, with ``id_field: file_stem`` (or ``auto``
when ids do not match), to the number at the end of the image file's stem (Flickr30K's TSV ids are the
Flickr photo ids, COCO's the ``cocoid``). Source ids absent from ``images.parquet`` are skipped and
counted; images of ``images.parquet`` absent from the source are an error naming them.
"""

from __future__ import annotations

import base64
import binascii
import csv
import itertools
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from itmatch.features.regions_io import (
    PER_IMAGE,
    RegionsError,
    RegionsMeta,
    create_regions,
    iter_blocks,
    open_regions,
    pad_regions,
    write_regions_parquet,
)
from itmatch.utils.h5 import check_finite, reading
from itmatch.utils.io import atomic_path
from itmatch.utils.logs import log, progress

TSV_FIELDS = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]
TSV_EXTRA = ["objects_id", "objects_conf", "attrs_id", "attrs_conf"]
SCAN_SPLITS = {"train": "train", "dev": "val", "val": "val", "test": "test", "testall": "test"}


class FeatureImportError(RegionsError):
    """Input features that cannot be imported; the message names the file and row/field."""


# ---------------------------------------------------------------- id matching


def _stem_number(file: str) -> int | None:
    m = re.search(r"(\d+)$", Path(file).stem)
    return int(m.group(1)) if m else None


class IdMap:
    """Source image id → row of ``images.parquet`` (by ``image_id`` or by the file stem's number)."""

    def __init__(self, images_parquet: str | Path, id_field: str = "auto"):
        t = pd.read_parquet(images_parquet, columns=["image_id", "split", "file", "width", "height"])
        self.table = t
        self.by_id = {int(v): i for i, v in enumerate(t["image_id"])}
        stems = [_stem_number(f) for f in t["file"]]
        self.by_stem = {v: i for i, v in enumerate(stems) if v is not None}
        if id_field not in ("auto", "image_id", "file_stem"):
            raise ValueError(f"id_field must be auto, image_id or file_stem, got {id_field!r}")
        self.id_field = id_field

    def decide(self, sample_ids: list[int]) -> None:
        """For ``auto``: pick whichever key matches more of the first source ids."""
        if self.id_field != "auto":
            return
        a = sum(i in self.by_id for i in sample_ids)
        b = sum(i in self.by_stem for i in sample_ids)
        self.id_field = "file_stem" if b > a else "image_id"
        log.info("matching source ids to images.parquet by %s (%d/%d of the first ids match)", self.id_field,
                 max(a, b), len(sample_ids))

    def row(self, source_id: int) -> int | None:
        m = self.by_stem if self.id_field == "file_stem" else self.by_id
        return m.get(int(source_id))

    def __len__(self) -> int:
        return len(self.table)


def _first_repeat(seen: np.ndarray, rows: np.ndarray) -> int | None:
    """The first of ``rows`` (images.parquet rows) already ``seen`` or occurring earlier in ``rows``; None if
    there is none."""
    again = seen[rows].copy()
    _, first = np.unique(rows, return_index=True)
    again[np.setdiff1d(np.arange(len(rows)), first)] = True
    bad = np.flatnonzero(again)
    return int(rows[bad[0]]) if len(bad) else None


def _check_complete(seen: np.ndarray, ids: IdMap, source: str) -> None:
    if not seen.all():
        miss = ids.table.loc[~seen, ["image_id", "file"]].head(5)
        raise FeatureImportError(f"{source}: {int((~seen).sum())} of {len(seen)} images of images.parquet have no "
                                 f"features, e.g. " + ", ".join(f"{r.image_id} ({r.file})" for r in miss.itertuples())
                                 + f" (ids matched by {ids.id_field}; set extraction.import.<dataset>.id_field)")


def read_names(path: str | Path | None) -> list[str]:
    """A class vocabulary file (one class per line, e.g. Visual Genome's ``objects_vocab.txt``); for lines
    listing synonyms ``a,b`` the first one."""
    if not path:
        return []
    with open(path, encoding="utf-8") as fh:
        return [line.strip().split(",")[0] for line in fh if line.strip()]


# ---------------------------------------------------------------- TSV


def _b64(value: str, dtype, n: int, path: str, line: int, field: str) -> np.ndarray:
    s = value.strip()
    if s.startswith(("b'", 'b"')) and s[-1:] in ("'", '"'):
        s = s[2:-1]
    try:
        raw = base64.b64decode(s, validate=False)
    except (binascii.Error, ValueError) as e:
        raise FeatureImportError(f"{path}:{line}: field {field!r} is not valid base64 ({e})") from e
    if dtype is None:  # integer ids: int64 or int32 by size
        dtype = np.int64 if n and len(raw) == 8 * n else np.int32
    arr = np.frombuffer(raw, dtype=dtype)
    if n == 0 or arr.size % n:
        raise FeatureImportError(f"{path}:{line}: field {field!r} has {arr.size} values, not a multiple of "
                                 f"num_boxes={n}")
    return arr.reshape(n, -1) if arr.size != n else arr


def _set_csv_limit() -> None:
    limit = sys.maxsize
    while True:  # features of one row exceed csv's default 128 KiB field limit
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


def iter_tsv(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, decoded row) of a bottom-up-attention TSV."""
    _set_csv_limit()
    path = str(path)
    with open(path, newline="", encoding="ascii", errors="replace") as fh:
        for line, row in enumerate(csv.reader(fh, delimiter="\t"), start=1):
            if not row or (line == 1 and row[0] == "image_id"):
                continue
            if len(row) not in (6, 10):
                raise FeatureImportError(f"{path}:{line}: {len(row)} tab-separated fields, expected 6 "
                                         f"({', '.join(TSV_FIELDS)}) or 10 (+ {', '.join(TSV_EXTRA)})")
            try:
                image_id, w, h, n = int(row[0]), int(float(row[1])), int(float(row[2])), int(row[3])
            except ValueError as e:
                raise FeatureImportError(f"{path}:{line}: bad image_id/image_w/image_h/num_boxes ({e})") from e
            d = {"image_id": image_id, "hw": (h, w),
                 "boxes": _b64(row[4], np.float32, n, path, line, "boxes"),
                 "features": _b64(row[5], np.float32, n, path, line, "features")}
            if d["boxes"].shape != (n, 4):
                raise FeatureImportError(f"{path}:{line}: boxes decode to shape {d['boxes'].shape}, expected ({n}, 4)")
            if len(row) == 10:
                d["object_id"] = _b64(row[6], None, n, path, line, "objects_id").reshape(n)
                d["object_conf"] = _b64(row[7], np.float32, n, path, line, "objects_conf").reshape(n)
                d["attribute_id"] = _b64(row[8], None, n, path, line, "attrs_id").reshape(n)
                d["attribute_conf"] = _b64(row[9], np.float32, n, path, line, "attrs_conf").reshape(n)
            yield line, d


def _peek_dim(first: dict[str, Any]) -> int:
    return int(first["features"].shape[1])


def import_tsv(tsv_files: list[str | Path], images_parquet: str | Path, out_h5: str | Path,
               out_parquet: str | Path, max_regions: int = 36, id_field: str = "auto",
               object_names: list[str] | None = None, attribute_names: list[str] | None = None) -> None:
    """Bottom-up-attention TSV file(s) → regions.h5 + regions.parquet."""
    ids = IdMap(images_parquet, id_field)
    files = [str(p) for p in tsv_files]
    if not files:
        raise FeatureImportError("no TSV files given (extraction.import.<dataset>.files)")
    first = next((d for p in files for _, d in iter_tsv(p)), None)
    if first is None:
        raise FeatureImportError(f"{files}: no rows")
    sample = [d["image_id"] for _, d in itertools.islice(iter_tsv(files[0]), 50)]
    ids.decide(sample)
    meta = RegionsMeta("bottom-up-attention TSV import", "unknown", _peek_dim(first), object_names or [],
                       attribute_names or [])
    _write_random_access(((f"{p}:{line}", d) for p in files for line, d in iter_tsv(p)), ids, meta, max_regions,
                         out_h5, out_parquet, source=", ".join(files))


def _write_random_access(rows, ids: IdMap, meta: RegionsMeta, r: int, out_h5, out_parquet, source: str) -> None:
    """Write decoded rows (in any order) to their images.parquet rows; check coverage; write the parquet."""
    seen = np.zeros(len(ids), dtype=bool)
    skipped = 0
    with atomic_path(out_h5) as tmp:
        with create_regions(tmp, len(ids), r, meta, image_ids=ids.table["image_id"].to_numpy()) as f:
            for where, d in progress(rows, desc="import regions", total=len(ids), unit="img"):
                i = ids.row(d["image_id"])
                if i is None:
                    skipped += 1
                    continue
                if seen[i]:
                    raise FeatureImportError(f"{where}: image id {d['image_id']} appears twice")
                if d["features"].shape[1] != meta.feature_dim:
                    raise FeatureImportError(f"{where}: feature dim {d['features'].shape[1]}, earlier rows have "
                                             f"{meta.feature_dim}")
                row = pad_regions(d, r, d["hw"], what=where)
                for name, v in row.items():
                    f[name][i] = v
                seen[i] = True
            _check_complete(seen, ids, source)
    if skipped:
        log.info("%s: skipped %d images not in images.parquet", source, skipped)
    n = write_regions_parquet(out_h5, out_parquet)
    log.info("imported %d images (%d regions) from %s", len(ids), n, source)


# ---------------------------------------------------------------- npz


def _npz_fields(path: Path) -> dict[str, Any]:
    """Arrays of one ``.npz`` (``allow_pickle=False``); ``"info_not_read": True`` when its tags sit only in a
    pickled ``info`` dict, which is never unpickled."""
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        d: dict[str, Any] = {k: z[k] for k in keys if k != "info"}
    if "objects_id" not in d and "info" in keys:
        d["info_not_read"] = True
    for k in ("x", "bbox", "image_h", "image_w"):
        if k not in d:
            raise FeatureImportError(f"{path}: missing key {k!r} (has {', '.join(sorted(keys))})")
    return d


def import_npz(folder: str | Path, images_parquet: str | Path, out_h5: str | Path, out_parquet: str | Path,
               max_regions: int = 36, object_names: list[str] | None = None,
               attribute_names: list[str] | None = None) -> None:
    """A folder of per-image ``.npz`` (named ``<file stem>.npz`` or ``<image_id>.npz``) → regions.h5 + parquet."""
    folder = Path(folder)
    ids = IdMap(images_parquet, "image_id")
    t = ids.table

    def path_of(i: int) -> Path:
        for name in (Path(t["file"].iat[i]).stem, str(t["image_id"].iat[i])):
            p = folder / f"{name}.npz"
            if p.exists():
                return p
        raise FeatureImportError(f"{folder}: no {Path(t['file'].iat[i]).stem}.npz or {t['image_id'].iat[i]}.npz for "
                                 f"images.parquet row {i} ({t['file'].iat[i]})")

    info_not_read: list[str] = []

    def rows():
        for i in range(len(t)):
            p = path_of(i)
            z = _npz_fields(p)
            if z.get("info_not_read"):
                info_not_read.append(p.name)
            n = len(z["bbox"])
            x = np.asarray(z["x"], np.float32)
            if x.ndim != 2 or n not in x.shape:
                raise FeatureImportError(f"{p}: 'x' has shape {x.shape}, expected [{n}, D] for {n} boxes")
            if x.shape[0] != n:
                x = x.T  # stored [D, n]
            d = {"image_id": int(t["image_id"].iat[i]), "features": x, "boxes": np.asarray(z["bbox"], np.float32),
                 "hw": (int(z["image_h"]), int(z["image_w"]))}
            for src, dst in zip(TSV_EXTRA, ("object_id", "object_conf", "attribute_id", "attribute_conf"),
                                strict=True):
                if src in z:
                    d[dst] = np.asarray(z[src]).reshape(n)
            yield str(p), d

    first = next(iter(rows()))[1]
    meta = RegionsMeta("bottom-up-attention npz import", "unknown", int(first["features"].shape[1]),
                       object_names or [], attribute_names or [])
    _write_random_access(rows(), ids, meta, max_regions, out_h5, out_parquet, source=str(folder))
    if info_not_read:
        log.warning("%s: %d file(s) keep their object/attribute tags only in a pickled 'info' dict, which is not "
                    "read (unpickling can run code): imported without tags (e.g. %s). Re-save them with top-level "
                    "objects_id/objects_conf/attrs_id/attrs_conf arrays to keep the tags.", folder,
                    len(set(info_not_read)), ", ".join(sorted(set(info_not_read))[:3]))


# ---------------------------------------------------------------- SCAN npy + PFAN boxes npy


def read_ids(path: str | Path) -> np.ndarray:
    """Image ids, one per row: ``.npy`` or text (one integer per line; a filename's trailing number counts)."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path).astype(np.int64).reshape(-1)
    out = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            s = line.strip()
            if not s:
                continue
            m = re.search(r"(\d+)(?:\.\w+)?$", s)
            if not m:
                raise FeatureImportError(f"{path}:{line_no}: no image id in {s!r}")
            out.append(int(m.group(1)))
    return np.asarray(out, np.int64)


def _stride(n_rows: int, n_split: int, src: np.ndarray | None) -> int:
    """5 when the array repeats every image once per caption (SCAN's "rkiros" layout), else 1."""
    if src is not None:
        if n_rows % 5 == 0 and len(src) == n_rows and n_rows and (src.reshape(-1, 5) == src[::5, None]).all():
            return 5
        return 1
    return 5 if n_split and n_rows == 5 * n_split else 1


def _split_rows(ids: IdMap, split: str, n_rows: int, src: np.ndarray | None, ids_file: str | None,
                source: str) -> np.ndarray:
    """images.parquet row of every row of a per-split array (-1: not in images.parquet)."""
    if src is not None:
        if len(src) == 5 * n_rows:  # ids listed per caption
            src = src[::5]
        if len(src) != n_rows:
            raise FeatureImportError(f"{ids_file}: {len(src)} ids for the {n_rows} rows of {source}")
        ids.decide(src[:50].tolist())
        return np.asarray([-1 if (r := ids.row(i)) is None else r for i in src], np.int64)
    rows = np.flatnonzero(ids.table["split"].to_numpy() == split)
    if n_rows != len(rows):
        raise FeatureImportError(f"{source}: {n_rows} rows but images.parquet has {len(rows)} {split} images; "
                                 f"give an ids file to map rows to image ids")
    return rows


def import_scan_npy(splits: dict[str, dict[str, str]], images_parquet: str | Path, out_h5: str | Path,
                    out_parquet: str | Path, id_field: str = "auto", block: int = 256) -> None:
    """SCAN's per-split ``*_ims.npy`` → regions.h5 (boxes missing) + regions.parquet.

    ``splits``: ``{split: {"features": path, "ids": path or None}}`` with split in train/val/test (SCAN's
    ``dev`` = val, ``testall`` = test). Arrays are read memory-mapped, ``block`` images at a time.
    """
    ids = IdMap(images_parquet, id_field)
    seen = np.zeros(len(ids), dtype=bool)
    arrays = {}
    for split, spec in splits.items():
        if split not in SCAN_SPLITS:
            raise FeatureImportError(f"SCAN split {split!r}: expected one of {', '.join(SCAN_SPLITS)}")
        arr = np.load(spec["features"], mmap_mode="r")
        if arr.ndim != 3:
            raise FeatureImportError(f"{spec['features']}: shape {arr.shape}, expected [images, regions, dim]")
        n_split = int((ids.table["split"] == SCAN_SPLITS[split]).sum())
        src = read_ids(spec["ids"]) if spec.get("ids") else None
        stride = _stride(arr.shape[0], n_split, src)   # _split_rows keeps one id of 5 per-caption ids
        arrays[split] = (arr, stride, _split_rows(ids, SCAN_SPLITS[split], arr.shape[0] // stride, src,
                                                  spec.get("ids"), spec["features"]))
    dims = {a.shape[1:] for a, _, _ in arrays.values()}
    if len(dims) != 1:
        raise FeatureImportError(f"SCAN splits differ in [regions, dim]: {sorted(dims)}")
    r, d = dims.pop()
    meta = RegionsMeta("SCAN precomputed features (npy import)", "unknown", int(d), boxes_missing=True)
    hw = ids.table[["height", "width"]].to_numpy(np.int32)
    with atomic_path(out_h5) as tmp:
        with create_regions(tmp, len(ids), r, meta, image_ids=ids.table["image_id"].to_numpy()) as f:
            for split, (arr, stride, rows) in arrays.items():
                n = arr.shape[0] // stride
                for a in progress(range(0, n, block), desc=f"import SCAN {split}", unit="block"):
                    b = min(n, a + block)
                    tgt = rows[a:b]
                    keep = tgt >= 0
                    if (twice := _first_repeat(seen, tgt[keep])) is not None:
                        raise FeatureImportError(f"{splits[split]['features']}: image id of images.parquet row "
                                                 f"{twice} imported twice")
                    feats = np.asarray(arr[a * stride:b * stride:stride], np.float16)  # checked as stored
                    check_finite(feats, spec["features"], "features", a)
                    feats = feats[keep]
                    order = np.argsort(tgt[keep])  # h5py fancy indexing needs increasing rows
                    dst = tgt[keep][order]
                    if len(dst):
                        f["features"][dst] = feats[order]
                        f["num_regions"][dst] = r
                        f["image_hw"][dst] = hw[dst]
                    seen[dst] = True
            _check_complete(seen, ids, ", ".join(s["features"] for s in splits.values()))
    n = write_regions_parquet(out_h5, out_parquet)
    log.info("imported SCAN features of %d images (%d regions, boxes missing)", len(ids), n)


def decode_pfan(arr: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """PFAN ``*_boxes.npy`` rows → (index [n,R,L], weight [n,R,L]): last axis 2L (indices then weights) or
    ``[..., L, 2]`` (index, weight) pairs."""
    a = np.asarray(arr)
    if a.ndim == 4 and a.shape[-1] == 2:
        return a[..., 0], a[..., 1]
    if a.ndim == 3 and a.shape[-1] % 2 == 0:
        L = a.shape[-1] // 2
        return a[..., :L], a[..., L:]
    raise FeatureImportError(f"{source}: shape {a.shape}; expected [images, regions, 2L] or [images, regions, L, 2]")


def import_pfan_boxes(splits: dict[str, dict[str, str]], images_parquet: str | Path, out: str | Path, K: int,
                      id_field: str = "auto", block: int = 1024) -> None:
    """PFAN's per-split ``*_boxes.npy`` + ids files → blocks.h5, rows re-aligned to images.parquet by image id.

    ``splits``: ``{split: {"boxes": path, "ids": path}}`` (ids required unless the rows already follow
    images.parquet's split order).
    """
    from itmatch.features.blocks import write_blocks

    ids = IdMap(images_parquet, id_field)
    seen = np.zeros(len(ids), dtype=bool)
    index = weight = None
    for split, spec in splits.items():
        if split not in SCAN_SPLITS:
            raise FeatureImportError(f"PFAN split {split!r}: expected one of {', '.join(SCAN_SPLITS)}")
        src = spec["boxes"]
        arr = np.load(src, mmap_mode="r")
        src_ids = read_ids(spec["ids"]) if spec.get("ids") else None
        n_split = int((ids.table["split"] == SCAN_SPLITS[split]).sum())
        stride = _stride(arr.shape[0], n_split, src_ids)  # 5: one row per caption, as SCAN's *_ims.npy can be
        n = arr.shape[0] // stride
        rows = _split_rows(ids, SCAN_SPLITS[split], n, src_ids, spec.get("ids"), src)
        for a in range(0, n, block):
            idx, w = decode_pfan(arr[a * stride:(a + block) * stride:stride], src)
            idx = np.rint(idx).astype(np.int64)
            w = np.asarray(w, np.float32)
            if index is None:
                n, R, L = len(ids), idx.shape[1], idx.shape[2]
                index = np.full((n, R, L), K * K, np.int16)
                weight = np.zeros((n, R, L), np.float32)
            if idx.shape[1:] != index.shape[1:]:
                raise FeatureImportError(f"{src}: [regions, L] = {idx.shape[1:]}, other splits {index.shape[1:]}")
            bad = (idx < 0) | (idx > K * K)
            if bad.any():
                raise FeatureImportError(f"{src}: block index {int(idx[bad][0])} outside 0..{K * K} (K={K}: "
                                         f"set blocks.K to the grid PFAN used)")
            if (w < 0).any() or not np.isfinite(w).all():
                raise FeatureImportError(f"{src}: negative or non-finite block weights")
            w = np.where(idx == K * K, 0, w)
            s = w.sum(-1, keepdims=True)
            w = np.where(s > 0, w / np.where(s > 0, s, 1), 0).astype(np.float32)
            tgt = rows[a:a + block]
            keep = tgt >= 0
            if _first_repeat(seen, tgt[keep]) is not None:
                raise FeatureImportError(f"{src}: an image appears twice")
            index[tgt[keep]] = idx[keep]
            weight[tgt[keep]] = w[keep]
            seen[tgt[keep]] = True
    if index is None:
        raise FeatureImportError("no PFAN boxes files given")
    _check_complete(seen, ids, ", ".join(s["boxes"] for s in splits.values()))
    write_blocks(out, ids.table["image_id"].to_numpy(), index, weight, K, index.shape[2])
    log.info("imported PFAN blocks of %d images (K=%d, L=%d) → %s", len(ids), K, index.shape[2], out)


# ---------------------------------------------------------------- h5 (this contract)


def _same_chunk_storage(src, dst) -> bool:
    """Whether raw chunks of ``src`` can be written as they are into ``dst`` (same chunk shape and filters)."""
    filters = [ds.id.get_create_plist() for ds in (src, dst)]
    sig = [tuple(p.get_filter(k)[0] for k in range(p.get_nfilters())) for p in filters]
    return src.chunks == dst.chunks and sig[0] == sig[1] and src.dtype == dst.dtype


def import_h5(file: str | Path, images_parquet: str | Path, out_h5: str | Path, out_parquet: str | Path,
              block: int = 1024) -> None:
    """A contract ``regions.h5`` → ``out_h5`` with rows re-aligned to ``images.parquet`` by image id (streamed in
    blocks of ``block`` images; features copied chunk by chunk, raw when the storage matches)."""
    ids = IdMap(images_parquet, "image_id")
    with open_regions(file) as src:
        with reading(file, "image_id"):
            src_ids = src["image_id"][:]
        rows = np.array([-1 if (i := ids.row(v)) is None else i for v in src_ids.tolist()], dtype=np.int64)
        keep = np.flatnonzero(rows >= 0)
        seen = np.zeros(len(ids), dtype=bool)
        if (rep := _first_repeat(seen, rows[keep])) is not None:
            raise FeatureImportError(f"{file}: image id {int(ids.table['image_id'].iloc[rep])} appears twice")
        seen[rows[keep]] = True
        _check_complete(seen, ids, str(file))
        src_of = np.empty(len(ids), dtype=np.int64)
        src_of[rows[keep]] = keep  # images.parquet row → source row
        with atomic_path(out_h5) as tmp:
            with create_regions(tmp, len(ids), src.r, src.meta, image_ids=ids.table["image_id"].to_numpy()) as f:
                raw = len(ids) > 0 and _same_chunk_storage(src["features"], f["features"])
                sf, df = src["features"], f["features"]
                for start, stop in progress(list(iter_blocks(len(ids), block)), desc="import regions.h5",
                                            unit="block"):
                    part = src_of[start:stop]
                    with reading(file, f"rows {int(part.min())}..{int(part.max())}"):
                        order = np.argsort(part, kind="stable")
                        for name in PER_IMAGE:
                            if name == "features":
                                continue
                            values = np.empty((len(part), *src[name].shape[1:]), src[name].dtype)
                            values[order] = src[name][part[order]]
                            f[name][start:stop] = values
                        if raw:
                            for k, j in enumerate(part.tolist()):
                                mask, data = sf.id.read_direct_chunk((j, 0, 0))
                                df.id.write_direct_chunk((start + k, 0, 0), data, mask)
                        else:
                            values = np.empty((len(part), *sf.shape[1:]), np.float16)
                            values[order] = sf[part[order]]
                            check_finite(values, file, "features", start, f["image_id"][start:stop])
                            df[start:stop] = values
    skipped = len(src_ids) - len(keep)
    if skipped:
        log.info("%s: skipped %d images not in images.parquet", file, skipped)
    n = write_regions_parquet(out_h5, out_parquet)
    log.info("imported %d images (%d regions) from %s%s", len(ids), n, file, " (raw chunk copy)" if raw else "")


def run_import(spec: dict[str, Any], images_parquet: str | Path, out_h5: str | Path, out_parquet: str | Path) -> None:
    """Dispatch one ``extraction.import.<dataset>`` entry to its importer."""
    fmt = spec.get("format")
    names = {"object_names": read_names(spec.get("object_vocab")),
             "attribute_names": read_names(spec.get("attribute_vocab"))}
    r = int(spec.get("max_regions", 36))
    if fmt == "tsv":
        import_tsv(spec["files"], images_parquet, out_h5, out_parquet, max_regions=r,
                   id_field=spec.get("id_field", "auto"), **names)
    elif fmt == "npz":
        import_npz(spec["folder"], images_parquet, out_h5, out_parquet, max_regions=r, **names)
    elif fmt == "scan_npy":
        import_scan_npy(spec["splits"], images_parquet, out_h5, out_parquet, id_field=spec.get("id_field", "auto"))
    elif fmt == "h5":
        import_h5(spec["file"], images_parquet, out_h5, out_parquet)
    else:
        raise FeatureImportError(f"extraction.import: unknown format {fmt!r} (tsv, npz, scan_npy, h5)")
