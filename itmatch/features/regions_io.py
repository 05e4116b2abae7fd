"""Reading and writing ``regions.h5`` / ``regions.parquet`` exactly per the artifact contract.

``regions.h5`` (N images in ``images.parquet`` row order, R regions, D feature dim)::

    image_id        int64   [N]
    features        float16 [N, R, D]   chunked one image per chunk (chunks of ≥ 64 KiB at 4 KiB file offsets)
    boxes           float32 [N, R, 4]   x1, y1, x2, y2 in original pixels (NaN when boxes are missing)
    image_hw        int32   [N, 2]      height, width
    object_id       int16   [N, R]      argmax class id (no background), -1 = unknown / padding
    attribute_id    int16   [N, R]
    object_conf     float16 [N, R]
    attribute_conf  float16 [N, R]
    num_regions     int16   [N]         valid regions; rows past it are zero

File attributes: ``detector``, ``weights_sha256``, ``feature_dim``, ``object_names`` and
``attribute_names`` (JSON lists), plus ``boxes_missing`` (bool): features imported without boxes
(SCAN's ``*_ims.npy``). Stages that need boxes call :func:`require_boxes`, which refuses such files.

Every non-empty dataset carries HDF5's fletcher32 checksum (a damaged chunk fails on read, and the error names
the file and how to rebuild it); float rows are checked for NaN/inf before they are written (features and
confidences; boxes may be NaN only in a ``boxes_missing`` file).

Shard files written by extraction use the same layout for their slice of rows plus the attributes
``row_start``, ``row_stop`` and a dataset ``done`` (int64 [1], rows complete so far).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from itmatch.utils.h5 import FILE_ALIGNMENT, NonFiniteError, check_finite, checksum, open_h5, reading

# name -> (dtype, trailing shape given R, D). Order = order of creation.
PER_IMAGE = ("features", "boxes", "image_hw", "object_id", "attribute_id", "object_conf", "attribute_conf",
             "num_regions")
DTYPES: dict[str, np.dtype] = {
    "image_id": np.dtype(np.int64),
    "features": np.dtype(np.float16),
    "boxes": np.dtype(np.float32),
    "image_hw": np.dtype(np.int32),
    "object_id": np.dtype(np.int16),
    "attribute_id": np.dtype(np.int16),
    "object_conf": np.dtype(np.float16),
    "attribute_conf": np.dtype(np.float16),
    "num_regions": np.dtype(np.int16),
}
DATASETS = ("image_id", *PER_IMAGE)
PARQUET_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("region", pa.int16()),
    ("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()), ("y2", pa.float32()),
    ("object", pa.string()), ("object_conf", pa.float32()),
    ("attribute", pa.string()), ("attribute_conf", pa.float32()),
])


class RegionsError(ValueError):
    """A regions file does not match the contract (the message names the file and dataset)."""


class BoxesMissingError(RegionsError):
    """The regions file has features but no boxes (imported from SCAN's ``*_ims.npy``)."""


@dataclass
class RegionsMeta:
    """The file attributes of ``regions.h5``."""

    detector: str
    weights_sha256: str
    feature_dim: int
    object_names: list[str] = field(default_factory=list)
    attribute_names: list[str] = field(default_factory=list)
    boxes_missing: bool = False

    def write(self, f: h5py.File) -> None:
        f.attrs["detector"] = self.detector
        f.attrs["weights_sha256"] = self.weights_sha256
        f.attrs["feature_dim"] = int(self.feature_dim)
        f.attrs["object_names"] = json.dumps(list(self.object_names))
        f.attrs["attribute_names"] = json.dumps(list(self.attribute_names))
        f.attrs["boxes_missing"] = bool(self.boxes_missing)

    @classmethod
    def read(cls, f: h5py.File) -> RegionsMeta:
        a = f.attrs
        missing = [k for k in ("detector", "weights_sha256", "feature_dim", "object_names", "attribute_names")
                   if k not in a]
        if missing:
            raise RegionsError(f"{f.filename}: missing file attribute(s) {', '.join(missing)}")
        return cls(detector=str(a["detector"]), weights_sha256=str(a["weights_sha256"]),
                   feature_dim=int(a["feature_dim"]), object_names=json.loads(a["object_names"]),
                   attribute_names=json.loads(a["attribute_names"]),
                   boxes_missing=bool(a.get("boxes_missing", False)))

    @classmethod
    def from_detector(cls, meta: dict[str, Any]) -> RegionsMeta:
        """From the ``meta`` dict returned by ``itmatch.features.detector.load_detector``."""
        return cls(detector=str(meta["detector"]), weights_sha256=str(meta["weights_sha256"]),
                   feature_dim=int(meta["feature_dim"]), object_names=list(meta.get("object_names", [])),
                   attribute_names=list(meta.get("attribute_names", [])))


def dataset_shapes(n: int, r: int, d: int) -> dict[str, tuple[int, ...]]:
    """The contract shape of every dataset (in :data:`DATASETS` order) for N images, R regions, D dims."""
    return {"image_id": (n,), "features": (n, r, d), "boxes": (n, r, 4), "image_hw": (n, 2),
            "object_id": (n, r), "attribute_id": (n, r), "object_conf": (n, r), "attribute_conf": (n, r),
            "num_regions": (n,)}


def create_regions(path: str | Path, n: int, r: int, meta: RegionsMeta, image_ids: np.ndarray | None = None,
                   block: int = 256, early_alloc: bool = False) -> h5py.File:
    """Create an empty contract file (all zeros, ``object_id`` -1) opened for writing; caller closes it.

    ``block``: rows per chunk of the small per-image datasets (features are one image per chunk).
    ``early_alloc``: allocate every chunk now, so that later writes touch raw data only and never the
    file's metadata (chunk index): a writer killed between flushes leaves a consistent file.
    """
    d = meta.feature_dim
    f = h5py.File(path, "w", **FILE_ALIGNMENT)  # feature chunks on 4 KiB boundaries: O_DIRECT reads, no copy
    meta.write(f)
    shapes = dataset_shapes(n, r, d)
    rows = max(1, min(block, n))
    for name in DATASETS:
        shape = shapes[name]
        chunks = (1, r, d) if name == "features" else (rows, *shape[1:])
        fill = -1 if name in ("object_id", "attribute_id") else 0
        if name == "boxes" and meta.boxes_missing:
            fill = np.nan
        dcpl = None
        if early_alloc:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        f.create_dataset(name, shape=shape, dtype=DTYPES[name], chunks=chunks if n > 0 else None,
                         fillvalue=fill, dcpl=dcpl, track_times=False, **checksum(shape))
    if image_ids is not None:
        f["image_id"][:] = np.asarray(image_ids, dtype=np.int64)
    return f


def pad_regions(det: dict[str, np.ndarray], r: int, hw: tuple[int, int], what: str = "image") -> dict[str, np.ndarray]:
    """One image's variable-length detections (n ≤ r rows) → fixed-size contract rows.

    ``det`` keys: features [n,D], boxes [n,4] (optional), object_id, object_conf, attribute_id,
    attribute_conf [n] (optional). Missing ids are -1, missing confidences 0.
    """
    feats = np.asarray(det["features"])
    n, d = feats.shape
    if n > r:
        raise RegionsError(f"{what}: {n} regions, more than the file's R={r} (raise extraction.max_regions)")
    out = {"features": np.zeros((r, d), np.float16), "boxes": np.zeros((r, 4), np.float32),
           "object_id": np.full(r, -1, np.int16), "attribute_id": np.full(r, -1, np.int16),
           "object_conf": np.zeros(r, np.float16), "attribute_conf": np.zeros(r, np.float16)}
    with np.errstate(over="ignore"):  # overflow to inf is caught just below, with the row named
        out["features"][:n] = feats
    if not np.isfinite(out["features"][:n]).all():  # checked as stored: float16 overflows to inf above 65504
        j = int(np.flatnonzero(~np.isfinite(out["features"][:n]).all(1))[0])
        raise NonFiniteError(f"{what}: region {j} has non-finite features (NaN/inf, or beyond float16's range "
                             f"±65504 as stored); not written")
    for key in ("boxes", "object_id", "attribute_id", "object_conf", "attribute_conf"):
        if det.get(key) is not None:
            v = np.asarray(det[key])
            if v.shape[0] != n:
                raise RegionsError(f"{what}: '{key}' has {v.shape[0]} rows, features have {n}")
            out[key][:n] = v.reshape(out[key][:n].shape)
            if key.endswith("_conf") and not np.isfinite(out[key][:n]).all():
                raise NonFiniteError(f"{what}: '{key}' has non-finite values; not written")
    out["image_hw"] = np.asarray(hw, np.int32)
    out["num_regions"] = np.int16(n)
    return out


def write_rows(f: h5py.File, start: int, rows: list[dict[str, np.ndarray]]) -> None:
    """Write consecutive padded rows (from :func:`pad_regions`) at ``start``."""
    if not rows:
        return
    stop = start + len(rows)
    values = {name: np.stack([row[name] for row in rows]).astype(DTYPES[name], copy=False) for name in PER_IMAGE}
    for name in ("features", "object_conf", "attribute_conf"):
        check_finite(values[name], f.filename, name, start, f["image_id"][start:stop])
    for name in PER_IMAGE:
        f[name][start:stop] = values[name]


def check_layout(f: h5py.File) -> tuple[int, int, int, RegionsMeta]:
    """Check datasets, dtypes, shapes and file attributes against the contract; return (N, R, D, meta)."""
    for name in DATASETS:
        if name not in f:
            raise RegionsError(f"{f.filename}: missing dataset '{name}'")
        if f[name].dtype != DTYPES[name]:
            raise RegionsError(f"{f.filename}: dataset '{name}' has dtype {f[name].dtype}, expected {DTYPES[name]}")
    n, r, d = f["features"].shape
    meta = RegionsMeta.read(f)
    if d != meta.feature_dim:
        raise RegionsError(f"{f.filename}: features have D={d}, attribute feature_dim={meta.feature_dim}")
    for name, shape in dataset_shapes(n, r, d).items():
        if f[name].shape != shape:
            raise RegionsError(f"{f.filename}: dataset '{name}' has shape {f[name].shape}, expected {shape}")
    return n, r, d, meta


class Regions:
    """A read-only view of ``regions.h5``: ``meta``, ``n``, ``r``, ``d`` and the h5py datasets by name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: regions file not found")
        self.file = open_h5(self.path)
        try:
            with reading(self.path, "layout"):
                self.n, self.r, self.d, self.meta = check_layout(self.file)
        except BaseException:
            self.file.close()
            raise

    def __getitem__(self, name: str) -> h5py.Dataset:
        return self.file[name]

    @property
    def has_boxes(self) -> bool:
        return not self.meta.boxes_missing

    def require_boxes(self, stage: str = "this stage") -> None:
        """Raise :class:`BoxesMissingError` if the file's boxes are missing."""
        if self.meta.boxes_missing:
            raise BoxesMissingError(
                f"{self.path}: {stage} needs region boxes, but these features were imported without boxes "
                f"(detector {self.meta.detector!r}, e.g. SCAN's *_ims.npy). Extract regions with the detector "
                f"(extraction.import.<dataset> unset) or import a format with boxes (TSV, npz); for PFAN/GLFN "
                f"blocks, import PFAN's *_boxes.npy into blocks.h5 instead.")

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Regions:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_regions(path: str | Path) -> Regions:
    """Open ``regions.h5`` read-only, checking its layout against the contract."""
    return Regions(path)


def require_boxes(path_or_regions: str | Path | Regions, stage: str = "this stage") -> None:
    """Raise :class:`BoxesMissingError` (naming the file and ``stage``) when the file has no boxes."""
    if isinstance(path_or_regions, Regions):
        path_or_regions.require_boxes(stage)
        return
    with open_regions(path_or_regions) as reg:
        reg.require_boxes(stage)


def iter_blocks(n: int, block: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, block):
        yield start, min(n, start + block)


def write_regions_parquet(h5_path: str | Path, parquet_path: str | Path, block: int = 256) -> int:
    """Write ``regions.parquet`` (one row per valid region, with names) from ``regions.h5``, streaming
    ``block`` images at a time. Boxes are null when the file's boxes are missing. Returns the row count."""
    from itmatch.utils.io import atomic_path

    total = 0
    with open_regions(h5_path) as reg, atomic_path(parquet_path) as tmp:
        obj_names = np.asarray(reg.meta.object_names + [None], dtype=object)  # id -1 → None
        att_names = np.asarray(reg.meta.attribute_names + [None], dtype=object)
        with pq.ParquetWriter(tmp, PARQUET_SCHEMA) as writer, reading(h5_path):
            for start, stop in iter_blocks(reg.n, block):
                nr = reg["num_regions"][start:stop].astype(np.int64)
                valid = np.arange(reg.r)[None, :] < nr[:, None]  # [B, R]
                img, reg_i = np.nonzero(valid)
                ids = reg["image_id"][start:stop][img]
                boxes = reg["boxes"][start:stop][img, reg_i]
                oid = reg["object_id"][start:stop][img, reg_i].astype(np.int64)
                aid = reg["attribute_id"][start:stop][img, reg_i].astype(np.int64)
                for name, ids_, names in (("object", oid, obj_names), ("attribute", aid, att_names)):
                    if len(names) == 1:  # no class names in the file (e.g. an import without vocabulary)
                        ids_[:] = -1
                        continue
                    bad = (ids_ >= len(names) - 1) | (ids_ < -1)
                    if bad.any():
                        raise RegionsError(f"{h5_path}: {name}_id {ids_[bad][0]} outside the "
                                           f"{len(names) - 1} {name}_names")
                box_cols = [pa.array(boxes[:, k], pa.float32(), mask=np.isnan(boxes[:, k])) for k in range(4)]
                table = pa.Table.from_arrays([
                    pa.array(ids, pa.int64()), pa.array(reg_i, pa.int16()), *box_cols,
                    pa.array(obj_names[oid], pa.string()),
                    pa.array(reg["object_conf"][start:stop][img, reg_i], pa.float32()),
                    pa.array(att_names[aid], pa.string()),
                    pa.array(reg["attribute_conf"][start:stop][img, reg_i], pa.float32()),
                ], schema=PARQUET_SCHEMA)
                writer.write_table(table)
                total += table.num_rows
    return total
