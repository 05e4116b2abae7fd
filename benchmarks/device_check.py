"""The one-GPU device check behind ``benchmarks/device_check.sh OUTDIR`` (≤ 8 minutes on one GPU).

1. ``pytest -m gpu`` (tests/test_gpu.py): CUDA vs CPU equivalence of region extraction, SCAN/PFAN scoring and one
   training step of each model. Without CUDA they are collected and skipped (the reason is printed).
2. Throughput on the GPU (skipped without CUDA, saying so): extraction images/s at 600×1000 (detector forward +
   region selection on preprocessed images, batch 1 and the best batch; the seeded published-layout R-101
   checkpoint when the package has it, else random weights of the published R-101 layout), SCAN (and PFAN) t2i /
   i2t scoring pairs/s on COCO-5K-size chunks and the projected time of the full 5,000 × 25,000 similarity
   matrix, training iterations/s of each model at batch 128 on COCO-size inputs; peak GPU memory of each.

Writes ``OUTDIR/device_check.json`` and ``OUTDIR/device_check.md`` (a table) after every stage, plus the tests'
log and JUnit XML. Exit status: 1 when a GPU test failed, else 0 (also when everything was skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from itmatch.config import load_config  # noqa: E402
from itmatch.corpus.synthetic import synthetic_batches  # noqa: E402
from itmatch.models.registry import MODELS, build_model  # noqa: E402
from itmatch.training.loss import ContrastiveLoss  # noqa: E402
from itmatch.training.settings import model_settings, part_config  # noqa: E402
from itmatch.utils.device import autocast, cuda_unavailable_reason, resolve_precision  # noqa: E402

COCO_TEST_IMAGES, COCO_TEST_CAPTIONS = 5000, 25000
DEV = torch.device("cuda")  # --dry-run-cpu: the CPU, to exercise this script's code on a machine without a GPU


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def peak_mb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if DEV.type == "cuda" else None


def empty_cache() -> None:
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak() -> None:
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def timed(fn, min_iters: int = 3, min_s: float = 1.0, max_s: float = 20.0, warmup: int = 1) -> tuple[float, int]:
    """(seconds per call, calls timed): ``warmup`` calls, then at least ``min_iters`` calls and ``min_s``."""
    for _ in range(warmup):
        fn()
    sync()
    t0, n = time.perf_counter(), 0
    while n < min_iters or (time.perf_counter() - t0 < min_s and time.perf_counter() - t0 < max_s):
        fn()
        n += 1
        if time.perf_counter() - t0 > max_s:
            break
    sync()
    return (time.perf_counter() - t0) / n, n


# ---- 1. the GPU tests ---------------------------------------------------------------------------------------
def run_gpu_tests(out: Path) -> dict[str, Any]:
    xml = out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}",
           str(REPO / "tests" / "test_gpu.py")]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (out / "gpu_tests.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    res: dict[str, Any] = {"command": "pytest -m gpu tests/test_gpu.py", "returncode": proc.returncode,
                           "seconds": round(time.time() - t0, 1)}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        cases = suite.findall("testcase") if suite is not None else []
        res.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        res["cases"] = [{"name": c.get("name"),
                         "status": "failed" if c.find("failure") is not None or c.find("error") is not None
                         else "skipped" if c.find("skipped") is not None else "passed",
                         "seconds": float(c.get("time", 0))} for c in cases]
        skips = {c.find("skipped").get("message", "") for c in cases if c.find("skipped") is not None}
        res["skip_reasons"] = sorted(skips)
        res["passed"] = res["tests"] - res["failures"] - res["errors"] - res["skipped"]
    print(proc.stdout[-3000:], flush=True)
    return res


# ---- 2. throughput ------------------------------------------------------------------------------------------
def extraction_throughput(config: dict, tmp: Path, batches: list[int], precision: str) -> dict[str, Any]:
    from itmatch.features.detector import detect, detector_config, load_detector, preprocess

    cfg = detector_config(config["detector"], "coco")
    try:
        from itmatch.features.detector.seeded import write_seeded_checkpoint

        path, which = write_seeded_checkpoint(tmp / "seeded.pth", seed=0), "seeded published-layout R-101"
    except ImportError:
        from extract_bench import random_checkpoint

        path, which = tmp / "r101.pt", "random weights, published R-101 layout"
        random_checkpoint(path, cfg, "r101")
    cfg = {**cfg, "inference": {**cfg["inference"], "precision": precision}}
    model, _ = load_detector(str(path), cfg, device=str(DEV))
    rng = np.random.default_rng(0)
    image = (rng.random((600, 1000, 3)) * 255).astype(np.uint8)
    x, scale = preprocess(image, cfg)
    x = x.to(DEV)
    rows = []
    for b in batches:
        reset_peak()
        try:
            with torch.inference_mode():
                sec, n = timed(lambda b=b: detect(model, [x] * b, [scale] * b, [(600, 1000)] * b, cfg), min_iters=3)
        except torch.OutOfMemoryError:
            rows.append({"batch": b, "error": "out of memory"})
            empty_cache()
            break
        rows.append({"batch": b, "images_per_s": round(b / sec, 1), "calls": n, "peak_gpu_mb": peak_mb()})
        print(json.dumps({"extraction": rows[-1]}), flush=True)
    ok = [r for r in rows if "images_per_s" in r]
    best = max(ok, key=lambda r: r["images_per_s"]) if ok else None
    return {"detector": which, "image": "600x1000 (resized to min_size/max_size of detector.inference)",
            "input_hw": list(x.shape[1:]), "precision": precision, "by_batch": rows,
            "batch1_images_per_s": rows[0].get("images_per_s") if rows else None,
            "best": best, "note": "detector forward + region selection on preprocessed images already on the "
                                  "GPU (no JPEG decoding, no HDF5 writes)"}


def scoring_throughput(config: dict, precision: str, image_chunk: int, caption_chunk: int) -> list[dict[str, Any]]:
    rows = []
    images, captions, info = synthetic_batches(image_chunk, caption_chunk, seed=7)
    images = {k: v.to(DEV) for k, v in images.items()}
    captions = {k: v.to(DEV) for k, v in captions.items()}
    for name in ("scan", "pfan"):
        for direction in ("t2i", "i2t"):
            torch.manual_seed(0)
            net = build_model(name, part_config(model_settings(config, name, None), direction), info).to(DEV).eval()
            reset_peak()
            with torch.inference_mode(), autocast(DEV, precision):
                enc_s, _ = timed(lambda net=net: (net.encode_images(images), net.encode_captions(captions)))
                img, cap = net.encode_images(images), net.encode_captions(captions)
                sec, n = timed(lambda net=net, img=img, cap=cap: net.score(img, cap))
            pairs = image_chunk * caption_chunk
            rate = pairs / sec
            # full 5K matrix: every image chunk × caption chunk scored, plus encoding 5K images and 25K captions
            encode_full = enc_s * max(COCO_TEST_IMAGES / image_chunk, COCO_TEST_CAPTIONS / caption_chunk)
            rows.append({"model": name, "direction": direction, "precision": precision,
                         "chunk": f"{image_chunk}x{caption_chunk}", "pairs_per_s": round(rate, 1), "calls": n,
                         "projected_5k_matrix_s": round(COCO_TEST_IMAGES * COCO_TEST_CAPTIONS / rate + encode_full, 1),
                         "peak_gpu_mb": peak_mb()})
            print(json.dumps({"scoring": rows[-1]}), flush=True)
            del net, img, cap
    return rows


def training_throughput(config: dict, precision: str, batch: int, max_s: float) -> list[dict[str, Any]]:
    rows = []
    images, captions, info = synthetic_batches(batch, batch, seed=8)
    images = {k: v.to(DEV) for k, v in images.items()}
    captions = {k: v.to(DEV) for k, v in captions.items()}
    crit = ContrastiveLoss(margin=0.2, max_violation=True)
    for name in MODELS:
        torch.manual_seed(0)
        cfg = model_settings(config, name, None)
        net = build_model(name, part_config(cfg, "t2i" if cfg.get("fuse") else None), info).to(DEV).train()
        opt = torch.optim.Adam(net.parameters(), lr=2e-4)
        scaler = torch.amp.GradScaler(DEV.type, enabled=precision == "fp16")

        def step(net=net, opt=opt, scaler=scaler):
            with autocast(DEV, precision):
                loss, _ = net.loss(images, captions, crit)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 2.0)
            scaler.step(opt)
            scaler.update()

        reset_peak()
        try:
            sec, n = timed(step, min_iters=2, min_s=2.0, max_s=max_s)
            rows.append({"model": name, "batch": batch, "precision": precision, "it_per_s": round(1 / sec, 2),
                         "steps": n, "peak_gpu_mb": peak_mb()})
        except torch.OutOfMemoryError:
            rows.append({"model": name, "batch": batch, "precision": precision, "error": "out of memory"})
        print(json.dumps({"training": rows[-1]}), flush=True)
        del net, opt
        empty_cache()
    return rows


def precision_stage(config: dict) -> dict[str, Any]:
    """bf16 / fp16 vs fp32 on the GPU: SCAN/PFAN scores and region features (benchmarks/precision_tolerance.py)."""
    import importlib.util

    import precision_tolerance as pt

    seeded = importlib.util.find_spec("itmatch.features.detector.seeded") is not None
    out: dict[str, Any] = {"scores": [], "regions": []}
    for p in ("bf16", "fp16"):
        for name in ("scan", "pfan"):
            for direction in ("t2i", "i2t"):
                out["scores"].append(pt.score_tolerance(config, name, direction, 32, 160, p, DEV))
        out["regions"].append(pt.detector_tolerance(config, p, DEV, 2, 160, "seeded" if seeded else None,
                                                    "coco" if seeded else "shapes", (600, 1000) if seeded else None))
        print(json.dumps({"precision": out["regions"][-1]}), flush=True)
    return out


# ---- report -------------------------------------------------------------------------------------------------
def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Device check ({r['started']})", "", f"- machine: {r['env']['gpu'] or 'no CUDA device'}; "
             f"torch {r['env']['torch']} (CUDA build {r['env']['torch_cuda']}); {r['env']['cpus']} CPUs",
             f"- total: {r.get('seconds', '?')} s", ""]
    t = r.get("gpu_tests", {})
    lines += ["## 1. `pytest -m gpu`", "",
              f"{t.get('passed', 0)} passed, {t.get('failures', 0) + t.get('errors', 0)} failed, "
              f"{t.get('skipped', 0)} skipped ({t.get('seconds', '?')} s)"
              + (f"; skipped because: {'; '.join(t['skip_reasons'])}" if t.get("skip_reasons") else ""), ""]
    if t.get("cases"):
        lines += ["| test | status | s |", "|---|---|---:|"]
        lines += [f"| {c['name']} | {c['status']} | {c['seconds']:.1f} |" for c in t["cases"]]
        lines.append("")
    lines += ["## 2. Throughput", ""]
    if r.get("throughput_skipped"):
        lines += [f"SKIPPED: {r['throughput_skipped']}", ""]
        return "\n".join(lines) + "\n"
    e = r.get("extraction")
    if e:
        lines += [f"Extraction ({e['detector']}, {e['image']}, input {e['input_hw']}, {e['precision']}; {e['note']}):",
                  "", "| batch | images/s | peak GPU MB |", "|---:|---:|---:|"]
        lines += [f"| {x['batch']} | {x.get('images_per_s', x.get('error'))} | {x.get('peak_gpu_mb', '')} |"
                  for x in e["by_batch"]]
        lines.append("")
    if r.get("scoring"):
        lines += ["Scoring (paper sizes, random weights, COCO-size inputs):", "",
                  "| model | direction | precision | chunk | pairs/s | projected 5K matrix s | peak GPU MB |",
                  "|---|---|---|---|---:|---:|---:|"]
        lines += [f"| {x['model']} | {x['direction']} | {x['precision']} | {x['chunk']} | {x['pairs_per_s']} | "
                  f"{x['projected_5k_matrix_s']} | {x['peak_gpu_mb']} |" for x in r["scoring"]]
        lines.append("")
    if r.get("training"):
        lines += ["Training (paper sizes, batch of COCO-size inputs, Adam + clipping):", "",
                  "| model | batch | precision | it/s | peak GPU MB |", "|---|---:|---|---:|---:|"]
        lines += [f"| {x['model']} | {x['batch']} | {x['precision']} | {x.get('it_per_s', x.get('error'))} | "
                  f"{x.get('peak_gpu_mb', '')} |" for x in r["training"]]
        lines.append("")
    pr = r.get("precision")
    if pr:
        lines += ["Precision vs fp32 (scores: largest abs. difference / std of the fp32 scores, top-1 kept; "
                  "regions: found again at IoU ≥ 0.99, min feature cosine):", "",
                  "| what | precision | max abs diff / std | t2i top-1 same | i2t top-1 same |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| {x['model']} {x['direction']} | {x['precision']} | {x['max_abs_rel_std']} | "
                  f"{x['t2i_top1_same']} | {x['i2t_top1_same']} |" for x in pr["scores"]]
        lines += [f"| regions ({x['detector']}, {x['size']}) | {x['precision']} | "
                  f"found again {x['regions_found_again']} | cosine min {x['feature_cosine_min']} | |"
                  for x in pr["regions"]]
        lines.append("")
    for k in ("skipped_stages", "errors"):
        if r.get(k):
            lines += [f"{k}: {r[k]}", ""]
    return "\n".join(lines) + "\n"


def save(out: Path, r: dict[str, Any]) -> None:
    for name, text in (("device_check.json", json.dumps(r, indent=1) + "\n"), ("device_check.md", markdown(r))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--budget-s", type=float, default=450, help="stop starting new stages after this")
    ap.add_argument("--precision", default="auto", help="throughput precision (auto: bf16 where supported)")
    ap.add_argument("--extract-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="run the throughput code on the CPU at tiny sizes (checks this script; numbers meaningless)")
    ap.add_argument("--score-chunk", type=int, nargs=2, default=[128, 512], metavar=("IMAGES", "CAPTIONS"))
    a = ap.parse_args(argv)
    global DEV
    out = Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cuda = torch.cuda.is_available()
    r: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "env": {
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None, "cpus": os.cpu_count(),
        "python": platform.python_version(), "host": platform.node()}, "skipped_stages": [], "errors": []}
    if not cuda:
        msg = f"no CUDA device: {cuda_unavailable_reason()}"
        print(f"device check: {msg}; the GPU tests are collected and skipped, the throughput part is SKIPPED",
              flush=True)
    if not a.skip_tests:
        r["gpu_tests"] = run_gpu_tests(out)
        save(out, r)
    if a.dry_run_cpu:
        DEV = torch.device("cpu")
        r["dry_run_cpu"] = True
    if not cuda and not a.dry_run_cpu:
        r["throughput_skipped"] = msg
    else:
        torch.backends.cuda.matmul.allow_tf32 = True  # throughput as the workflow runs (TF32 where fp32)
        torch.backends.cudnn.allow_tf32 = True
        precision = resolve_precision(a.precision, DEV, "--precision")
        config = load_config(REPO / "config" / "config.yaml")
        stages = (("precision", lambda: precision_stage(config)),
                  ("extraction", lambda: extraction_throughput(config, out, a.extract_batches, precision)),
                  ("scoring", lambda: scoring_throughput(config, precision, *a.score_chunk)),
                  ("training", lambda: training_throughput(config, precision, a.train_batch,
                                                           max_s=max(5.0, (a.budget_s - (time.time() - t0)) / 8))))
        for name, fn in stages:
            if time.time() - t0 > a.budget_s:
                r["skipped_stages"].append(f"{name} (time budget of {a.budget_s:.0f} s spent)")
                continue
            try:
                r[name] = fn()
            except Exception as e:  # one failing stage must not lose the others' numbers
                r["errors"].append(f"{name}: {type(e).__name__}: {e}")
            empty_cache()
            r["seconds"] = round(time.time() - t0, 1)
            save(out, r)
    r["seconds"] = round(time.time() - t0, 1)
    save(out, r)
    print((out / "device_check.md").read_text(encoding="utf-8"))
    print(f"wrote {out / 'device_check.json'} and {out / 'device_check.md'}")
    tests = r.get("gpu_tests", {})
    return 1 if tests.get("failures", 0) or tests.get("errors", 0) or r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
