"""Training-data throughput: samples/s per DataLoader worker of the training data path on synthetic COCO-size
inputs (the contract's regions.h5: float16 features [N, 36, 2048], one image per chunk; 5 captions per image).

    .venv/bin/python benchmarks/loader_bench.py --dir /tmp/loader_bench --images 113287 --workers 1 2
    .venv/bin/python benchmarks/loader_bench.py --dir /tmp/loader_bench --images 20000     # smaller file

The inputs are written once by ``create_regions`` (the extraction's own writer, so the chunk layout is the
contract's) and reused while their shape matches. The full COCO size is 113,287 × 36 × 2048 × 2 bytes ≈ 16.7 GB.
It times ``itmatch.corpus.data`` exactly as training uses it (PairDataset → loader with the epoch's seeded
random batches, collate_pairs) after a warm-up of ``--warmup`` batches, and checks that the chunking lets a
worker read one image's regions in one read (one chunk = one image). Prints a JSON summary (``--json`` writes it).
Target: ≥ 5,000 samples/s per worker (issue 18: a GPU step should never wait on I/O).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from itmatch.corpus.data import Corpus, DataPaths, PairDataset, collate_pairs, epoch_batches, loader  # noqa: E402
from itmatch.features.regions_io import RegionsMeta, create_regions  # noqa: E402

COCO_TRAIN_IMAGES = 113_287  # Karpathy split train + restval (docs/contract.md)
VOCAB = 10_000


def write_inputs(root: Path, n: int, r: int, d: int, per: int = 5, seed: int = 0, block: int = 512) -> DataPaths:
    """Synthetic contract inputs for ``n`` train images (reused when they exist with this shape)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = DataPaths(images=str(root / "images.parquet"), captions=str(root / "captions.parquet"),
                      tokens=str(root / "tokens.parquet"), vocab=str(root / "vocab.json"),
                      regions=str(root / "regions.h5"))
    done = root / f".complete-{n}x{r}x{d}"
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


def time_loader(paths: DataPaths, workers: int, batch: int, batches: int, warmup: int, seed: int = 0,
                float16: bool = False) -> dict:
    """Wall-clock samples/s, and the CPU-bound rate per worker (samples per CPU second the workers used:
    what one worker delivers with a core of its own, independent of other load on the machine)."""
    corpus = Corpus(paths)
    ds = PairDataset(corpus, corpus.rows("train", "captions"))
    order = epoch_batches(len(ds), batch, seed, 0)[: warmup + batches]  # random images, as in training
    collate = partial(collate_pairs, float16=True) if float16 else collate_pairs
    it = iter(loader(ds, order, num_workers=workers, collate=collate, persistent=True))  # as training
    for _ in range(warmup):
        next(it)
    pids = [w.pid for w in getattr(it, "_workers", [])] or [os.getpid()]
    c0 = sum(_cpu_seconds(p) for p in pids)
    t0, n = time.perf_counter(), 0
    for images, _captions in it:
        n += int(images["features"].shape[0])
    dt = time.perf_counter() - t0
    cpu = sum(_cpu_seconds(p) for p in pids) - c0
    return {"workers": workers, "batch": batch, "batches": batches, "features": str(images["features"].dtype),
            "samples": n, "seconds": round(dt, 3), "samples_per_s": round(n / dt, 1),
            "samples_per_s_per_worker": round(n / dt / max(1, workers), 1),
            "worker_cpu_seconds": round(cpu, 3), "samples_per_cpu_s_per_worker": round(n / max(cpu, 1e-9), 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/itmatch_loader_bench", help="folder of the synthetic inputs")
    ap.add_argument("--images", type=int, default=COCO_TRAIN_IMAGES)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--workers", type=int, nargs="+", default=[1])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", help="write the summary here")
    a = ap.parse_args(argv)
    paths = write_inputs(Path(a.dir), a.images, a.regions, a.dim)
    out = {"images": a.images, "regions": a.regions, "dim": a.dim,
           "file_gb": round(os.path.getsize(paths.regions) / 1e9, 2), "chunking": chunk_check(paths.regions),
           "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "runs": []}
    for w in a.workers:
        for f16 in (False, True):
            out["runs"].append(time_loader(paths, w, a.batch, a.batches, a.warmup, float16=f16))
            print(json.dumps(out["runs"][-1]), file=sys.stderr)
    text = json.dumps(out, indent=1)
    if a.json:
        Path(a.json).write_text(text + "\n", encoding="utf-8")
    print(text)
    return out


if __name__ == "__main__":
    main()
