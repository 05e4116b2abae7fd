"""Training-data throughput: samples/s per DataLoader worker of the training data path on synthetic COCO-size
inputs (the contract's regions.h5: float16 features [N, 36, 2048], one image per chunk, fletcher32-checksummed
as the extraction writes it; 5 captions per image), next to the per-sample path it replaced, in one run.

    .venv/bin/python benchmarks/loader_bench.py --dir /tmp/loader_bench --images 113287 --workers 0 1
    .venv/bin/python benchmarks/loader_bench.py --dir /tmp/loader_bench --images 20000     # smaller file

The inputs are written once by ``create_regions`` (the extraction's own writer, so the chunk layout and the
checksums are the contract's) and reused while their shape matches. The full COCO size is 113,287 × 36 × 2048 ×
2 bytes ≈ 16.7 GB. Two paths, each as training runs it (the epoch's seeded random batches of 128, a
persistent DataLoader), after ``--warmup`` batches:

- ``ours``: ``itmatch.corpus.data`` (``PairDataset.__getitems__`` → one raw-chunk read per image with the
  checksums verified in one vectorised pass per group, straight into a reused shared-memory slot);
- ``baseline``: the path before it: one ``__getitem__`` per sample, the features through h5py (HDF5's own
  fletcher32 filter), the batch stacked item by item into fresh shared memory (torch's DataLoader as is).

Each run reads other random images (the epoch differs), and before each timed run the file's pages are dropped
from the page cache (``POSIX_FADV_DONTNEED``; ``--warm`` keeps them), so both paths read from the disk. It
reports wall-clock samples/s and samples per CPU-second of the loading processes (the workers, or the main
process without workers): what one worker delivers with a core of its own, whatever else loads the machine.
First the paths' batches are compared (identical tensors, in process and through a worker, or the run stops).
Prints a JSON summary and a Markdown table (``--json`` writes the summary). Target: ≥ 5,000 samples/s per
worker (issue 18).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from itmatch.corpus.data import (  # noqa: E402
    IMAGE_META,
    PREFETCH_FACTOR,
    Corpus,
    DataPaths,
    PairDataset,
    collate_pairs,
    epoch_batches,
    loader,
)
from itmatch.features.regions_io import RegionsMeta, create_regions  # noqa: E402
from itmatch.utils.h5 import reading  # noqa: E402

COCO_TRAIN_IMAGES = 113_287  # Karpathy split train + restval (docs/contract.md)
VOCAB = 10_000


def write_inputs(root: Path, n: int, r: int, d: int, per: int = 5, seed: int = 0, block: int = 512) -> DataPaths:
    """Synthetic contract inputs for ``n`` train images (reused when they exist with this shape)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = DataPaths(images=str(root / "images.parquet"), captions=str(root / "captions.parquet"),
                      tokens=str(root / "tokens.parquet"), vocab=str(root / "vocab.json"),
                      regions=str(root / "regions.h5"))
    done = root / f".complete-{n}x{r}x{d}-aligned"  # (files of the earlier, unaligned layout are rewritten)
    if done.exists():
        return paths
    for stale in root.glob(".complete-*"):
        stale.unlink()
    rng = np.random.default_rng(seed)
    ids = np.arange(n, dtype=np.int64)
    pq.write_table(pa.table({"image_id": ids, "split": ["train"] * n, "file": [f"{i}.jpg" for i in ids],
                             "width": np.full(n, 640), "height": np.full(n, 480)}), paths.images)
    cap_img = np.repeat(ids, per)
    pq.write_table(pa.table({"caption_id": np.arange(n * per, dtype=np.int64), "image_id": cap_img,
                             "split": ["train"] * (n * per), "text": [""] * (n * per)}), paths.captions)
    lengths = rng.integers(8, 16, n * per)  # COCO captions: ~10.5 words on average
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = rng.integers(4, VOCAB, int(offsets[-1])).astype(np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    pq.write_table(pa.table({"caption_id": pa.array(np.arange(n * per, dtype=np.int64)), "tokens": tokens}),
                   paths.tokens)
    Path(paths.vocab).write_text(json.dumps({"idx2word": [f"w{i}" for i in range(VOCAB)]}), encoding="utf-8")
    meta = RegionsMeta(detector="synthetic", weights_sha256="0" * 64, feature_dim=d)
    tmp = root / "regions.h5.tmp"
    base = rng.standard_normal((block, r, d)).astype(np.float16)  # content does not matter (no compression)
    t0 = time.time()
    with create_regions(tmp, n, r, meta, image_ids=ids) as f:
        for s in range(0, n, block):
            e = min(n, s + block)
            f["features"][s:e] = np.roll(base, s % block, axis=0)[: e - s]
            f["num_regions"][s:e] = r
            xy = rng.uniform(0, 400, (e - s, r, 2)).astype(np.float32)
            f["boxes"][s:e] = np.concatenate([xy, xy + 100], axis=2)
            f["image_hw"][s:e] = [480, 640]
            f["object_id"][s:e] = rng.integers(0, 1600, (e - s, r))
            f["attribute_id"][s:e] = rng.integers(0, 400, (e - s, r))
            f["object_conf"][s:e] = 0.5
    os.replace(tmp, paths.regions)
    print(f"wrote {paths.regions} ({os.path.getsize(paths.regions) / 1e9:.2f} GB) in {time.time() - t0:.0f} s",
          file=sys.stderr)
    done.touch()
    return paths


def chunk_check(path: str) -> dict:
    """The features' chunk shape, and whether one image's regions are exactly one chunk (one read)."""
    with h5py.File(path, "r") as f:
        ds = f["features"]
        n, r, d = ds.shape
        info = ds.id.get_chunk_info(min(5, n - 1))
        return {"chunks": list(ds.chunks), "one_image_one_chunk": ds.chunks == (1, r, d),
                "chunk_bytes": int(info.size), "compression": ds.compression,
                "chunk_cache_bytes": int(f.id.get_access_plist().get_cache()[2])}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PerSample(Dataset):
    """The per-sample path this replaced: ``ds[k]`` reads one image's features through h5py (HDF5's fletcher32
    filter) and takes its small arrays from memory; no ``__getitems__``, so the collate stacks item by item."""

    def __init__(self, pairs: PairDataset):
        self.corpus, self.rows = pairs.corpus, pairs.rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[dict, dict]:
        c = self.corpus
        cap = int(self.rows[k])
        row = int(c.caption_image[cap])
        with reading(c.regions.path, f"image row {row}"):
            item = {"features": c.regions.dataset("features")[row], "index": row}
        for key, value in c.image_meta.items():
            item[key] = int(value[row]) if key == "num_regions" else value[row].astype(IMAGE_META[key])
        return item, c.caption_item(cap)


def make_loader(path: str, ds: PairDataset, batches: list[list[int]], workers: int, collate):
    if path == "ours":
        return loader(ds, batches, num_workers=workers, collate=collate, persistent=True)  # as training
    kw = {"prefetch_factor": PREFETCH_FACTOR, "persistent_workers": True} if workers else {}
    return DataLoader(PerSample(ds), batch_sampler=batches, num_workers=workers, collate_fn=collate, **kw)


def time_loader(paths: DataPaths, path: str, workers: int, batch: int, batches: int, warmup: int, epoch: int,
                float16: bool = False, seed: int = 0, cold: bool = True) -> dict:
    """Wall-clock samples/s, and samples per CPU-second of the loading processes (per worker)."""
    corpus = Corpus(paths)
    ds = PairDataset(corpus, corpus.rows("train", "captions"))
    order = epoch_batches(len(ds), batch, seed, epoch)[: warmup + batches]  # random images, as in training
    collate = partial(collate_pairs, float16=True) if float16 else collate_pairs
    ld = make_loader(path, ds, order, workers, collate)
    it = iter(ld)
    for _ in range(warmup):
        next(it)
    if cold:  # this file's pages out of the page cache: both paths read from the disk
        fd = os.open(paths.regions, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    pids = (ld.worker_pids() if path == "ours" else [w.pid for w in getattr(it, "_workers", [])]) or [os.getpid()]
    main = os.getpid()
    c0, m0 = sum(_cpu_seconds(p) for p in pids), _cpu_seconds(main)
    t0, n = time.perf_counter(), 0
    for images, _captions in it:
        n += int(images["features"].shape[0])
    dt = time.perf_counter() - t0
    cpu, main_cpu = sum(_cpu_seconds(p) for p in pids) - c0, _cpu_seconds(main) - m0
    run = {"path": path, "workers": workers, "features": str(images["features"].dtype), "batch": batch,
           "batches": batches, "samples": n, "seconds": round(dt, 3), "samples_per_s": round(n / dt, 1),
           "loading_cpu_seconds": round(cpu, 3), "samples_per_cpu_s_per_worker": round(n / max(cpu, 1e-9), 1),
           "main_process_cpu_seconds": round(main_cpu if workers else cpu, 3),
           "load_average": [round(x, 2) for x in os.getloadavg()]}
    return run


def table(runs: list[dict]) -> str:
    """Markdown: one row per (workers, features), baseline and ours side by side."""
    lines = ["| loader | batch features | baseline wall samples/s | ours wall samples/s | baseline samples per "
             "CPU-s per worker | ours samples per CPU-s per worker | speed-up (CPU) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    by = {(r["path"], r["workers"], r["features"]): r for r in runs}
    for (path, w, feat), ours in by.items():
        if path != "ours" or ("baseline", w, feat) not in by:
            continue
        base = by[("baseline", w, feat)]
        who = "main process (`num_workers: 0`)" if w == 0 else f"{w} worker{'s' if w > 1 else ''}"
        lines.append(f"| {who} | {feat.replace('torch.', '')} | {base['samples_per_s']:,.0f} | "
                     f"{ours['samples_per_s']:,.0f} | {base['samples_per_cpu_s_per_worker']:,.0f} | "
                     f"**{ours['samples_per_cpu_s_per_worker']:,.0f}** | "
                     f"{ours['samples_per_cpu_s_per_worker'] / base['samples_per_cpu_s_per_worker']:.1f}× |")
    return "\n".join(lines)


def same_batches(paths: DataPaths, batch: int) -> bool:
    """Both paths give identical batches (every tensor, float16 and float32) for the first seeded batch, in
    the main process and through one worker each; stops the run otherwise."""
    corpus = Corpus(paths)
    ds = PairDataset(corpus, corpus.rows("train", "captions"))
    order = epoch_batches(len(ds), batch, 0, 0)[:1]
    for f16 in (True, False):
        collate = partial(collate_pairs, float16=f16)
        got = [collate([PerSample(ds)[k] for k in order[0]]), collate(ds.__getitems__(order[0]))]
        got += [next(iter(make_loader(p, ds, order, 1, collate))) for p in ("baseline", "ours")]
        for other in got[1:]:
            for x, y in zip(got[0], other, strict=True):
                if set(x) != set(y) or not all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x):
                    raise SystemExit(f"float16 {f16}: the two paths give different batches")
    return True


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/itmatch_loader_bench", help="folder of the synthetic inputs")
    ap.add_argument("--images", type=int, default=COCO_TRAIN_IMAGES)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--paths", nargs="+", default=["baseline", "ours"], choices=["baseline", "ours"])
    ap.add_argument("--seed", type=int, default=0, help="of the batch order (another seed reads other images)")
    ap.add_argument("--warm", action="store_true", help="leave the file's pages in the page cache between runs "
                    "(default: drop them before each timed run, so both paths read from the disk)")
    ap.add_argument("--json", help="write the summary here")
    a = ap.parse_args(argv)
    paths = write_inputs(Path(a.dir), a.images, a.regions, a.dim)
    out = {"images": a.images, "regions": a.regions, "dim": a.dim, "seed": a.seed, "cold": not a.warm,
           "file_gb": round(os.path.getsize(paths.regions) / 1e9, 2), "chunking": chunk_check(paths.regions),
           "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(), "runs": []}
    out["same_batches"] = same_batches(paths, a.batch)
    epoch = 0
    for w in a.workers:
        for f16 in (True, False):
            for path in a.paths:
                epoch += 1
                run = time_loader(paths, path, w, a.batch, a.batches, a.warmup, epoch, float16=f16, seed=a.seed,
                                  cold=not a.warm)
                run["epoch"] = epoch
                out["runs"].append(run)
                print(json.dumps(run), file=sys.stderr, flush=True)
    out["load_average_end"] = os.getloadavg()
    text = json.dumps(out, indent=1)
    if a.json:
        Path(a.json).write_text(text + "\n", encoding="utf-8")
    print(text)
    print(table(out["runs"]))
    return out


if __name__ == "__main__":
    main()
