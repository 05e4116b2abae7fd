"""Benchmark region extraction: images/s and peak memory for a given config, checkpoint and device.

Runs the real pipeline (DataLoader workers decoding + resizing, batched ``detect``, HDF5 writing) over
``--n`` images and times it after a warm-up batch. Images come from a dataset the workflow ingested
(``--images-parquet`` + ``--image-dir``) or are synthetic (``--synthetic HxW``); the detector is a
checkpoint (``--checkpoint``) or random weights of the configured architecture (``--random {demo,r101}``:
the shapes demo net or the published R-101 C4 layout with 1601/401 classes).

Examples::

    .venv/bin/python benchmarks/extract_bench.py --dataset shapes --random demo --synthetic 160x160 --n 64
    .venv/bin/python benchmarks/extract_bench.py --dataset coco --random r101 --synthetic 480x640 --n 16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from itmatch.config import load_config  # noqa: E402
from itmatch.features import extract as ex  # noqa: E402
from itmatch.features.detector import detector_config  # noqa: E402


def synthetic_images(folder: Path, n: int, h: int, w: int) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i}.jpg", quality=90)
        rows.append({"image_id": i, "split": "test", "file": f"{i}.jpg", "width": w, "height": h})
    pq = folder / "images.parquet"
    pd.DataFrame(rows).to_parquet(pq)
    return pq


def random_checkpoint(path: Path, cfg: dict, which: str) -> None:
    from itmatch.features.detector.checkpoint import save_own
    from itmatch.features.detector.model import build_model

    if which == "demo":
        arch = {**cfg["architecture"], "num_object_classes": 7, "num_attribute_classes": 13}
    else:
        arch = dict(cfg["published"])
    torch.manual_seed(0)
    model = build_model(arch)
    save_own(path, model, cfg["input"], [f"o{i}" for i in range(arch["num_object_classes"] - 1)],
             [f"a{i}" for i in range(arch["num_attribute_classes"] - 1)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    ap.add_argument("--dataset", default="shapes", help="selects detector.per_dataset overrides")
    ap.add_argument("--checkpoint", help="detector checkpoint (default: --random)")
    ap.add_argument("--random", choices=["demo", "r101"], default="demo")
    ap.add_argument("--images-parquet")
    ap.add_argument("--image-dir")
    ap.add_argument("--synthetic", default="160x160", help="HxW of generated images when no dataset is given")
    ap.add_argument("--n", type=int, default=64, help="images to extract")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda (default: extraction.device)")
    ap.add_argument("--batch-size", type=int, help="override detector.inference.batch_size")
    ap.add_argument("--workers", type=int, help="override extraction.workers")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="override detector.inference.precision")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()

    config = load_config(args.config)
    cfg = detector_config(config["detector"], args.dataset)
    if args.batch_size:
        cfg["inference"]["batch_size"] = args.batch_size
    if args.precision:
        cfg["inference"]["precision"] = args.precision
    extraction = {k: v for k, v in config["extraction"].items() if k != "import"}
    if args.device:
        extraction["device"] = args.device
    if args.workers is not None:
        extraction["workers"] = args.workers
    extraction["threads"] = args.threads
    opts = ex.ExtractOptions.from_config(extraction, cfg)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.images_parquet:
            t = pd.read_parquet(args.images_parquet).head(args.n)
            pq = tmp / "images.parquet"
            t.to_parquet(pq)
            image_dir = Path(args.image_dir)
        else:
            h, w = map(int, args.synthetic.lower().split("x"))
            image_dir = tmp
            pq = synthetic_images(tmp, args.n, h, w)
        ckpt = Path(args.checkpoint) if args.checkpoint else tmp / "model.pt"
        if not args.checkpoint:
            random_checkpoint(ckpt, cfg, args.random)
        stamps: list[tuple[float, int]] = []
        device = ex.resolve_device(opts.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ex.extract_shard(pq, image_dir, tmp / "shard.h5", 0, 1, ckpt, cfg, opts,
                         on_batch=lambda done: stamps.append((time.perf_counter(), done)))
        total = time.perf_counter() - t0
    if len(stamps) >= 2:  # after the first (warm-up) batch
        (ta, da), (tb, db) = stamps[0], stamps[-1]
        ips = (db - da) / (tb - ta)
    else:
        ips = args.n / total
    out = {"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
           "images": args.n, "batch_size": opts.batch_size, "workers": opts.workers,
           "precision": cfg["inference"].get("precision"), "torch_threads": torch.get_num_threads(),
           "images_per_s": round(ips, 3), "wall_s_incl_load": round(total, 2),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "peak_rss_worker_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
           "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
           "checkpoint": str(args.checkpoint or f"random {args.random}"), "dataset_cfg": args.dataset}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
