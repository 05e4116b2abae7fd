"""Side-by-side speed of OUR region extractor and the REFERENCE's (MILVLG/bottom-up-attention.pytorch) on the same
images: images/s for both from one run.

Both run the published model's architecture (ResNet-101 C4, res5 dilation 2, 1601 classes / 401 attributes, 300
proposals, 36 regions per image) with the seeded checkpoint (``itmatch.features.detector.seeded``; the speed does
not depend on the weights' values) at real size (short side 600, long side at most 1000), one image at a time on
the CPU (``--threads`` torch threads, default 2) or in batches of ``--batch`` on CUDA (``--device cuda``).
Each side times decode + preprocessing + model + region selection per image after one warm-up image; model
construction and weight loading are not counted.

- OURS: ``load_detector`` + ``preprocess`` + ``detect`` from ``itmatch.features.detector`` (config
  ``detector.inference`` with ``num_regions: fixed``, ``regions: 36``).
- REFERENCE: ``tools/reference/bench_reference.py`` started with the reference environment's Python
  (``--reference-python``) on ``--reference-root`` (the reference's own ``extract_feat_singlegpu`` loop, fix36);
  skipped with a message when those are not given or do not run.

Example::

    .venv/bin/python benchmarks/reference_bench.py --reference-root ../refwork/bua \\
        --reference-python ../refwork/venv/bin/python
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from itmatch.config import load_config  # noqa: E402
from itmatch.features.detector import detect, detector_config, load_detector, preprocess  # noqa: E402
from itmatch.features.detector.seeded import write_seeded_checkpoint  # noqa: E402

IMAGES = ROOT / "tests" / "fixtures" / "reference" / "images"


def read_rgb(path: Path):  # noqa: ANN201 - numpy array
    im = cv2.imread(str(path))
    if im is None:
        raise SystemExit(f"cannot decode image {path}")
    return cv2.cvtColor(im, cv2.COLOR_BGR2RGB)


def time_ours(checkpoint: Path, images: list[Path], device: str, threads: int, batch: int, repeat: int,
              precision: str | None) -> dict:
    cfg = copy.deepcopy(detector_config(load_config(ROOT / "config" / "config.yaml")["detector"]))
    cfg["inference"].update({"num_regions": "fixed", "regions": 36, "min_size": 600, "max_size": 1000})
    if precision:
        cfg["inference"]["precision"] = precision
    precision = cfg["inference"].get("precision", "fp32") if device == "cuda" else "fp32"  # CPU always fp32
    torch.set_num_threads(threads)
    model, _ = load_detector(str(checkpoint), cfg, device=device)

    def run(paths: list[Path]) -> None:
        rgb = [read_rgb(p) for p in paths]
        pre = [preprocess(im, cfg) for im in rgb]
        out = detect(model, [t for t, _ in pre], [s for _, s in pre], [im.shape[:2] for im in rgb], cfg)
        if any(len(o["boxes"]) != 36 for o in out):
            raise SystemExit("our extractor did not return 36 regions per image")
        if device == "cuda":
            torch.cuda.synchronize()

    run(images[:batch])  # warm-up
    work = [p for _ in range(repeat) for p in images]
    seconds = []
    for i in range(0, len(work), batch):
        chunk = work[i:i + batch]
        t = time.perf_counter()
        run(chunk)
        seconds.extend([(time.perf_counter() - t) / len(chunk)] * len(chunk))
    return {"device": device, "threads": threads, "batch": batch, "precision": precision, "seconds": seconds,
            "images_per_s": len(seconds) / sum(seconds)}


def time_reference(args: argparse.Namespace, checkpoint: Path, images_dir: Path) -> dict | str:
    """The reference's timing (bench_reference.py in its environment), or why it was skipped."""
    if not args.reference_root or not args.reference_python:
        return "skipped: give --reference-root and --reference-python (the reference's environment) to time it"
    if not Path(args.reference_python).exists() or not Path(args.reference_root).is_dir():
        return f"skipped: {args.reference_python} or {args.reference_root} does not exist"
    cmd = [str(args.reference_python), str(ROOT / "tools" / "reference" / "bench_reference.py"),
           "--reference-root", str(args.reference_root), "--checkpoint", str(checkpoint),
           "--images", str(images_dir), "--threads", str(args.threads), "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        return f"skipped: the reference failed (exit {proc.returncode}):\n{tail}"
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=IMAGES, help="folder of images (default: the fixture images)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for both")
    ap.add_argument("--batch", type=int, default=None, help="our batch size (default: 1 on CPU, 16 on CUDA)")
    ap.add_argument("--repeat", type=int, default=None, help="passes over the images for ours "
                    "(default: 1 on CPU, 8 on CUDA)")
    ap.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                    help="ours on CUDA (default: detector.inference.precision of the config; CPU is always fp32)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the seeded checkpoint (written to /tmp)")
    ap.add_argument("--reference-root", type=Path, default=None, help="MILVLG/bottom-up-attention.pytorch, built")
    ap.add_argument("--reference-python", type=Path, default=None, help="the reference environment's python")
    ap.add_argument("--skip-ours", action="store_true", help="time only the reference")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    batch = args.batch or (16 if args.device == "cuda" else 1)
    repeat = args.repeat or (8 if args.device == "cuda" else 1)
    images = sorted(p for p in args.images.iterdir() if p.is_file() and not p.name.startswith("."))
    if not images:
        raise SystemExit(f"no images in {args.images}")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or write_seeded_checkpoint(Path(tmp) / "seeded.pth")
        ours = None if args.skip_ours else time_ours(checkpoint, images, args.device, args.threads, batch, repeat,
                                                        args.precision)
        ref = time_reference(args, checkpoint, args.images.resolve())
    print(f"{len(images)} images from {args.images}, R-101 C4, 36 regions, short side 600 / long side <= 1000")
    print(f"{'extractor':<10} {'device':<6} {'precision':<9} {'threads':>7} {'batch':>5} {'images':>6} "
          f"{'s/image (median)':>17} {'images/s':>9}")
    rows = [("ours", ours), ("reference", ref)]
    for name, r in rows:
        if isinstance(r, dict):
            prec, b = r.get("precision", "fp32"), r.get("batch", 1)
            print(f"{name:<10} {r['device']:<6} {prec:<9} {r['threads']:>7} {b:>5} {len(r['seconds']):>6} "
                  f"{statistics.median(r['seconds']):>17.2f} {r['images_per_s']:>9.3f}")
        elif r is not None:
            print(f"{name:<10} {r}")
    if isinstance(ours, dict) and isinstance(ref, dict):
        print(f"ours / reference: {ours['images_per_s'] / ref['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
