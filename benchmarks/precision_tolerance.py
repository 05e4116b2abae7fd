"""How far bf16 / fp16 autocast moves SCAN / PFAN scores and detector region features from fp32.

    .venv/bin/python benchmarks/precision_tolerance.py --json /tmp/precision.json
    .venv/bin/python benchmarks/precision_tolerance.py --device cuda          # the same on a GPU

Scores: each model at the paper's sizes (config.yaml, no dataset override; random seeded weights) on synthetic
COCO-size inputs (36 × 2048 regions, captions of 8–16 words): encode + score under autocast, compared with fp32:
largest and mean absolute difference, both relative to the spread (standard deviation) of the fp32 scores, and
how often the top-ranked image of a caption (t2i) / caption of an image (i2t) stays the same.
Region features: the demo detector (shapes config, random seeded weights, or ``--checkpoint``) on synthetic
images; regions are matched by box (IoU ≥ 0.99) and their features compared (cosine similarity, largest
absolute difference relative to the largest fp32 magnitude); the fraction of fp32 regions found again.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from itmatch.config import load_config  # noqa: E402
from itmatch.corpus.synthetic import synthetic_batches  # noqa: E402
from itmatch.features.detector import detect, detector_config, load_detector, preprocess  # noqa: E402
from itmatch.features.detector.boxes import box_iou  # noqa: E402
from itmatch.models.registry import build_model  # noqa: E402
from itmatch.training.settings import model_settings, part_config  # noqa: E402
from itmatch.utils.device import autocast  # noqa: E402


def score_tolerance(config: dict, model: str, direction: str, n_img: int, n_cap: int, precision: str,
                    device: torch.device) -> dict:
    images, captions, info = synthetic_batches(n_img, n_cap, seed=1)
    images = {k: v.to(device) for k, v in images.items()}
    captions = {k: v.to(device) for k, v in captions.items()}
    torch.manual_seed(0)
    net = build_model(model, part_config(model_settings(config, model, None), direction), info).to(device).eval()
    out = {}
    with torch.inference_mode():
        for p in ("fp32", precision):
            with autocast(device, p):
                s = net.score(net.encode_images(images), net.encode_captions(captions))
            out[p] = s.float().cpu().numpy()
    ref, low = out["fp32"], out[precision]
    diff = np.abs(low - ref)
    spread = float(ref.std())
    return {"model": model, "direction": direction, "precision": precision, "pairs": int(ref.size),
            "score_std": round(spread, 6), "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "max_abs_rel_std": round(float(diff.max()) / spread, 5), "mean_abs_rel_std": round(float(diff.mean())
                                                                                                  / spread, 5),
            "t2i_top1_same": float((ref.argmax(0) == low.argmax(0)).mean()),
            "i2t_top1_same": float((ref.argmax(1) == low.argmax(1)).mean())}


def detector_tolerance(config: dict, precision: str, device: torch.device, n: int, size: int,
                       checkpoint: str | None, dataset: str = "shapes", hw: tuple[int, int] | None = None) -> dict:
    """``checkpoint``: a detector file, ``seeded`` (the seeded published-layout R-101, when the package has
    it; use ``dataset="coco"``), or None (the demo detector with random seeded weights)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from extract_bench import random_checkpoint  # (the extraction benchmark's random demo detector)

    cfg = detector_config(config["detector"], dataset)
    if checkpoint == "seeded":
        from itmatch.features.detector.seeded import write_seeded_checkpoint

        path = write_seeded_checkpoint(Path(tempfile.gettempdir()) / "itmatch-precision-seeded.pth")
    elif checkpoint:
        path = Path(checkpoint)
    else:
        path = Path(tempfile.gettempdir()) / "itmatch-precision-demo.pt"
        random_checkpoint(path, cfg, "demo")
    rng = np.random.default_rng(0)
    h, w = hw or (size, size)
    ims = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for _ in range(n)]
    res = {}
    for p in ("fp32", precision):
        c = {**cfg, "inference": {**cfg["inference"], "precision": p}}
        model, _ = load_detector(str(path), c, device=str(device))
        pre = [preprocess(im, c) for im in ims]
        with torch.inference_mode():
            res[p] = detect(model, [x.to(device) for x, _ in pre], [s for _, s in pre], [im.shape[:2] for im in ims], c)
    cos, rel, found, total = [], [], 0, 0
    for a, b in zip(res["fp32"], res[precision], strict=True):
        fa, fb = torch.as_tensor(a["features"]).float(), torch.as_tensor(b["features"]).float()
        total += len(fa)
        if not len(fa) or not len(fb):
            continue
        iou = box_iou(torch.as_tensor(a["boxes"]).float(), torch.as_tensor(b["boxes"]).float())
        best, j = iou.max(dim=1)
        hit = best >= 0.99
        found += int(hit.sum())
        fa, fb = fa[hit], fb[j[hit]]
        cos += torch.nn.functional.cosine_similarity(fa, fb, dim=1).tolist()
        rel.append(float((fa - fb).abs().max() / fa.abs().max().clamp_min(1e-12)))
    return {"detector": checkpoint or "demo, random seeded weights", "precision": precision, "images": n,
            "size": f"{h}x{w}", "regions_fp32": total, "regions_found_again": round(found / max(1, total), 4),
            "feature_cosine_min": round(min(cos), 6) if cos else None,
            "feature_cosine_mean": round(float(np.mean(cos)), 6) if cos else None,
            "feature_max_abs_rel": round(max(rel), 5) if rel else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp16"])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--captions", type=int, default=160)
    ap.add_argument("--det-images", type=int, default=4)
    ap.add_argument("--det-size", type=int, default=160)
    ap.add_argument("--checkpoint", help="detector checkpoint, or 'seeded' (the seeded published-layout R-101 at "
                    "600x1000); default: the demo detector with random weights")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = load_config(REPO / "config" / "config.yaml")
    rows = {"device": str(device), "scores": [], "regions": []}
    for p in a.precisions:
        for model in ("scan", "pfan"):
            for direction in ("t2i", "i2t"):
                rows["scores"].append(score_tolerance(config, model, direction, a.images, a.captions, p, device))
                print(json.dumps(rows["scores"][-1]), flush=True)
        seeded = a.checkpoint == "seeded"
        rows["regions"].append(detector_tolerance(config, p, device, a.det_images, a.det_size, a.checkpoint,
                                                  "coco" if seeded else "shapes", (600, 1000) if seeded else None))
        print(json.dumps(rows["regions"][-1]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
