"""Bottom-up region extraction, sharded and resumable, then gathered into ``regions.h5``.

Shard ``s`` of ``S`` (0-based) covers the contiguous rows ``[s·N//S, (s+1)·N//S)`` of ``images.parquet``.
DataLoader workers decode and resize images (the detector's picklable ``preprocess``); the main process
runs ``detect`` on batches under ``torch.inference_mode`` (on the GPU when there is one) and writes each
batch into the shard's HDF5 file, then records the rows done (dataset ``done``) and flushes. Every chunk
of the shard file is allocated when it is created, so later writes change raw data only, never HDF5
metadata: a kill at any point leaves a readable file whose rows before ``done`` are complete.
The file lives under ``.<name>.partial.h5`` until complete, then is renamed; a re-run after a kill
reopens it and continues at ``done`` (:class:`itmatch.utils.resume.H5Partial`: a partial shard of other
settings or rows, or a damaged one, is started over). Batches always start at multiples of the batch size from the
shard start, so an interrupted-and-resumed shard holds exactly what an uninterrupted one holds.

:func:`gather_shards` checks the shards (same detector, contiguous rows, same image ids as
``images.parquet``) and copies them into the final ``regions.h5`` a block of images at a time, then
writes ``regions.parquet`` from it, also streaming.

The shard machinery is shared with the other per-image feature stages (BSSAN's VGG-19 grid,
:mod:`itmatch.features.grid`): :func:`open_shard` / :func:`mark_done` / :func:`finish_shard` for a resumable
shard file, :func:`gather_rows` with a :class:`ShardLayout` for the gather.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from itmatch.config import schema_defaults
from itmatch.features.regions_io import (
    PER_IMAGE,
    RegionsError,
    RegionsMeta,
    check_layout,
    create_regions,
    iter_blocks,
    pad_regions,
    write_regions_parquet,
    write_rows,
)
from itmatch.utils import device as utils_device
from itmatch.utils.h5 import open_h5, reading
from itmatch.utils.io import atomic_path
from itmatch.utils.logs import log, progress
from itmatch.utils.resume import KEY_ATTR, H5Partial, fingerprint
from itmatch.utils.shards import parse_scatteritem, shard_rows  # noqa: F401 (re-exported: the shard scripts)


@dataclass
class ExtractOptions:
    """Run settings: the ``extraction`` config section plus the detector's batch size and region count (no
    defaults here: :meth:`from_config` fills what the config leaves out from the schema, their one home)."""

    batch_size: int  # images per detect() call (detector.inference.batch_size)
    max_regions: int  # R, the region axis of regions.h5 (see region_slots)
    workers: int  # DataLoader worker processes decoding + resizing images (0 = in the main process)
    device: str  # auto (cuda when available) | cpu | cuda
    threads: int  # torch intra-op threads (0 = leave torch's default)
    gather_block: int  # images copied at a time when gathering

    @classmethod
    def from_config(cls, extraction: dict[str, Any], detector_cfg: dict[str, Any]) -> ExtractOptions:
        """From the ``extraction`` section and the (per-dataset) ``detector`` section."""
        e = {**schema_defaults("extraction"), **extraction}
        return cls(batch_size=int(detector_cfg["inference"]["batch_size"]), max_regions=region_slots(detector_cfg),
                   workers=int(e["workers"]), device=str(e["device"]), threads=int(e["threads"]),
                   gather_block=int(e["gather_block"]))


def region_slots(detector_cfg: dict[str, Any], default: int = 36) -> int:
    """R of regions.h5: ``inference.regions`` in fixed mode, ``inference.max_regions`` in adaptive mode."""
    inf = detector_cfg.get("inference", {})
    if inf.get("num_regions", "fixed") == "adaptive":
        return int(inf.get("max_regions", default))
    return int(inf.get("regions", default))


def resolve_device(device: str) -> torch.device:
    """:func:`itmatch.utils.device.resolve_device`, refusing ``cuda`` up front when torch sees no GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("extraction.device is 'cuda' but torch sees no CUDA device (use 'auto' or 'cpu')")
    return utils_device.resolve_device(device, "extraction.device")


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 HWC RGB with OpenCV's ``cv2.imread(path, IMREAD_COLOR)``, as the reference
    extractor reads images (so EXIF orientation and JPEG decoding are the same as there); an error names the
    file when it is missing or cannot be decoded (never skipped silently)."""
    if not Path(path).is_file():
        raise RegionsError(f"{path}: image file does not exist")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise RegionsError(f"{path}: cannot decode image (OpenCV could not read it as an image)")
    return np.ascontiguousarray(bgr[:, :, ::-1])  # HWC RGB


class ImageFolderDataset(Dataset):
    """Rows of ``images.parquet`` → (row, preprocessed CHW tensor, scale, (h, w)) in DataLoader workers."""

    def __init__(self, files: list[str], rows: list[int], preprocess: Callable, cfg: dict[str, Any]):
        self.files, self.rows, self.preprocess, self.cfg = files, rows, preprocess, cfg

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        img = load_image(self.files[i])
        tensor, scale = self.preprocess(img, self.cfg)
        return self.rows[i], tensor, float(scale), (int(img.shape[0]), int(img.shape[1]))


def collate(items):
    """Keep images as a list (they differ in size): (rows, tensors, scales, hws)."""
    rows, tensors, scales, hws = zip(*items, strict=True)
    return list(rows), list(tensors), list(scales), list(hws)


def _detector_backend(backend: ModuleType | None) -> ModuleType:
    if backend is not None:
        return backend
    import itmatch.features.detector as det  # the real pure-PyTorch bottom-up detector

    return det


def partial_path(out: str | Path) -> Path:
    """The stable temporary name a shard is written under until complete (resumed after a kill)."""
    out = Path(out)
    return out.with_name(f".{out.stem}.partial{out.suffix}")


def _fingerprint(meta: RegionsMeta, detector_cfg: dict[str, Any], opts: ExtractOptions,
                 image_ids: np.ndarray) -> str:
    """What a partial shard must match to be resumed: weights, detector settings, R, batch size, rows."""
    relevant = {k: detector_cfg.get(k) for k in ("input", "inference", "architecture", "published", "vocab")}
    return fingerprint([asdict(meta), relevant, opts.max_regions, opts.batch_size],
                       np.ascontiguousarray(image_ids, dtype=np.int64).tobytes(), length=64)


def _shard_consistent(f: h5py.File, n: int, check: Callable[[h5py.File], Any]) -> bool:
    """A partial shard's own test: ``check(f)`` (the stage's layout; raises when wrong) and a row count in 0..n."""
    check(f)
    return "done" in f and 0 <= int(f["done"][0]) <= n


def open_shard(out: str | Path, fingerprint: str, n: int, attrs: dict[str, Any],
               create: Callable[[Path], h5py.File], check: Callable[[h5py.File], Any] = check_layout
               ) -> tuple[h5py.File, Path]:
    """The partial file of shard ``out`` (n rows) opened for writing, and its path: the existing one when it
    belongs to this run (same ``fingerprint``, layout passing ``check``), else a new one from ``create(path)``
    (an empty file whose chunks are all allocated, so later writes touch raw data only) with ``attrs``, the
    fingerprint and ``done`` = 0. Write rows in order, call :func:`mark_done` after each batch and
    :func:`finish_shard` when all n are done."""
    out = Path(out)
    tmp = partial_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    f = H5Partial(tmp, fingerprint, "partial shard").open(lambda g: _shard_consistent(g, n, check))
    if f is None:
        f = create(tmp)
        f.attrs.update({**attrs, KEY_ATTR: fingerprint})
        f.create_dataset("done", data=np.zeros(1, np.int64), track_times=False)  # contiguous: raw writes only
        f.flush()
    return f, tmp


def mark_done(f: h5py.File, done: int) -> None:
    """Record that the shard's first ``done`` rows are complete, and flush."""
    f["done"][0] = done
    f.flush()


def finish_shard(tmp: Path, out: str | Path) -> Path:
    """Rename a complete (closed) partial shard to its final name."""
    return H5Partial(tmp, "", "partial shard").finish(out)


def extract_shard(images_parquet: str | Path, image_dir: str | Path, out: str | Path, shard: int,
                  n_shards: int, detector_path: str | Path, detector_cfg: dict[str, Any],
                  opts: ExtractOptions, backend: ModuleType | None = None,
                  on_batch: Callable[[int], None] | None = None) -> Path:
    """Extract the regions of shard ``shard`` of ``n_shards`` into ``out`` (resuming a partial run).

    ``backend``: a module with ``load_detector``, ``preprocess``, ``detect`` (default: the real detector).
    ``on_batch(done)`` is called after each batch is flushed (tests inject interruptions there).
    """
    det = _detector_backend(backend)
    out = Path(out)
    table = pd.read_parquet(images_parquet, columns=["image_id", "file"])
    start, stop = shard_rows(len(table), shard, n_shards)
    part = table.iloc[start:stop]
    ids = part["image_id"].to_numpy(np.int64)
    n = len(part)
    device = resolve_device(opts.device)
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    model, dmeta = det.load_detector(str(detector_path), detector_cfg, device=str(device))
    meta = RegionsMeta.from_detector(dmeta)
    fp = _fingerprint(meta, detector_cfg, opts, ids)
    f, tmp = open_shard(out, fp, n, {"row_start": start, "row_stop": stop, "shard": shard, "n_shards": n_shards},
                        lambda p: create_regions(p, n, opts.max_regions, meta, image_ids=ids, early_alloc=True))
    done = int(f["done"][0])
    log.info("shard %d/%d: rows %d..%d of %s (%d images, %d already done), device %s, detector %s",
             shard + 1, n_shards, start, stop, images_parquet, n, done, device, meta.detector)
    try:
        if done < n:
            files = [str(Path(image_dir) / name) for name in part["file"].tolist()[done:]]
            dataset = ImageFolderDataset(files, list(range(done, n)), det.preprocess, detector_cfg)
            loader = DataLoader(dataset, batch_size=opts.batch_size, shuffle=False, num_workers=opts.workers,
                                collate_fn=collate, pin_memory=device.type == "cuda")
            t0 = time.perf_counter()
            with torch.inference_mode():
                bar = progress(loader, desc=f"extract {out.name}", total=len(loader), unit="batch")
                for rows, tensors, scales, hws in bar:
                    tensors = [t.to(device, non_blocking=True) for t in tensors]
                    dets = det.detect(model, tensors, scales, hws, detector_cfg)  # fp16/bf16: detector config
                    padded = [pad_regions({k: _np(v) for k, v in d.items()}, opts.max_regions, hw,
                                          what=f"{images_parquet} row {start + row}")
                              for row, d, hw in zip(rows, dets, hws, strict=True)]
                    if rows[0] != done:
                        raise RuntimeError(f"batch starts at shard row {rows[0]}, expected {done}")
                    write_rows(f, done, padded)
                    done += len(rows)
                    mark_done(f, done)
                    if on_batch is not None:
                        on_batch(done)
            secs = time.perf_counter() - t0
            log.info("shard %d/%d: %d images in %.1f s (%.2f images/s)", shard + 1, n_shards, len(files), secs,
                     len(files) / max(secs, 1e-9))
    finally:
        f.close()
    return finish_shard(tmp, out)


def _np(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().float().cpu().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
    return v


@dataclass(frozen=True)
class ShardLayout:
    """What :func:`gather_rows` needs to know of a sharded per-image HDF5 artifact (regions.h5, grid.h5)."""

    what: str                                            # the artifact, for messages and the progress bar
    check: Callable[[h5py.File], tuple[int, Any]]        # file → (rows, signature every shard must share)
    describe: Callable[[Any], str]                       # a signature in words, for the mismatch message
    mismatch: str                                        # what differs when signatures differ
    create: Callable[[Path, np.ndarray, Any], h5py.File]  # (path, image ids, signature) → empty output file
    datasets: tuple[str, ...]                            # per-image datasets copied (image_id: by create)
    error: type[Exception] = RegionsError


def gather_rows(shards: list[str | Path], images_parquet: str | Path, out_h5: str | Path, layout: ShardLayout,
                block: int = 64) -> None:
    """Check complete shard files (same signature, contiguous rows, complete, the image ids of
    ``images.parquet``) and copy them into ``out_h5`` ``block`` images at a time (written atomically)."""
    ids = pd.read_parquet(images_parquet, columns=["image_id"])["image_id"].to_numpy(np.int64)
    err = layout.error
    files: list[h5py.File] = []
    try:
        for p in shards:
            files.append(open_h5(p))
        order = sorted(range(len(files)), key=lambda i: int(files[i].attrs.get("row_start", -1)))
        files = [files[i] for i in order]
        names = [str(shards[i]) for i in order]
        with reading(", ".join(names), "shard layout"):
            layouts = [layout.check(f) for f in files]
        sig = layouts[0][1]
        expect = 0
        for name, f, (n, s) in zip(names, files, layouts, strict=True):
            if s != sig:
                raise err(f"{name}: {layout.mismatch} differ from {names[0]} ({layout.describe(s)} vs "
                          f"{layout.describe(sig)})")
            row_start, row_stop = int(f.attrs["row_start"]), int(f.attrs["row_stop"])
            if row_start != expect or row_stop - row_start != n:
                raise err(f"{name}: covers rows {row_start}..{row_stop}, expected to start at {expect}")
            with reading(name, "done, image_id"):
                done = int(f["done"][0]) if "done" in f else -1
                shard_ids = f["image_id"][:]
            if done != n:
                raise err(f"{name}: incomplete shard ({done} of {n} rows)")
            if not np.array_equal(shard_ids, ids[row_start:row_stop]):
                raise err(f"{name}: image ids differ from {images_parquet} rows {row_start}..{row_stop} "
                          f"(images.parquet changed since extraction?)")
            expect = row_stop
        if expect != len(ids):
            raise err(f"shards cover {expect} rows, {images_parquet} has {len(ids)}")
        with atomic_path(out_h5) as tmp:
            g = layout.create(tmp, ids, sig)
            try:
                bar = progress(total=len(ids), desc=f"gather {layout.what}", unit="img", iterable=None)
                for name_f, f in zip(names, files, strict=True):
                    base = int(f.attrs["row_start"])
                    for a, b in iter_blocks(f["features"].shape[0], block):
                        for name in layout.datasets:
                            with reading(name_f, f"dataset '{name}' rows {a}..{b}"):
                                chunk = f[name][a:b]
                            g[name][base + a:base + b] = chunk
                        bar.update(b - a)
                bar.close()
            finally:
                g.close()
    finally:
        for f in files:
            f.close()


def _regions_signature(f: h5py.File) -> tuple[int, tuple[int, RegionsMeta]]:
    n, r, _, meta = check_layout(f)
    return n, (r, meta)


REGIONS_LAYOUT = ShardLayout(
    what="regions", check=_regions_signature, mismatch="detector, class names or R",
    describe=lambda s: f"{s[1].detector}/{s[1].weights_sha256[:12]}, R={s[0]}",
    create=lambda path, ids, s: create_regions(path, len(ids), s[0], s[1], image_ids=ids), datasets=PER_IMAGE)


def gather_shards(shards: list[str | Path], images_parquet: str | Path, out_h5: str | Path,
                  out_parquet: str | Path, block: int = 64) -> None:
    """Concatenate complete shard files into ``regions.h5`` (``block`` images at a time) + ``regions.parquet``."""
    gather_rows(shards, images_parquet, out_h5, REGIONS_LAYOUT, block)
    rows = write_regions_parquet(out_h5, out_parquet, block=max(block, 256))
    log.info("gathered %d shards: %d regions → %s, %s", len(shards), rows, out_h5, out_parquet)
