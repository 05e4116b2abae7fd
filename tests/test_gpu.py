"""CUDA vs CPU equivalence (``pytest -m gpu``; skipped without a CUDA device; run by benchmarks/device_check.sh).

- Region extraction: the seeded published-layout R-101 checkpoint (``itmatch.features.detector.seeded``) when the
  package has it, else the demo detector with random seeded weights; one 600×1000 image (the R-101) or four
  160×160 images (the demo); fp32 on both devices (TF32 off): the same regions (boxes matched at IoU ≥ 0.99)
  with the same features.
- Scoring: SCAN and PFAN (t2i, i2t) at the paper's sizes, fp32 CUDA vs CPU, and bf16 autocast within the
  tolerance of docs/gpu.md.
- Training: one step (loss, gradients) of each of the six models at the paper's sizes, CUDA vs CPU; plus that
  bf16 and fp16 (with a gradient scaler) steps run and stay finite.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.config import load_config
from itmatch.corpus.synthetic import synthetic_batches
from itmatch.features.detector import detect, detector_config, load_detector, preprocess
from itmatch.features.detector.boxes import box_iou
from itmatch.models.registry import MODELS, build_model
from itmatch.training.loss import ContrastiveLoss
from itmatch.training.settings import model_settings, part_config
from itmatch.utils.device import autocast, resolve_precision

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not CUDA, reason="no CUDA device (torch.cuda.is_available() is False)")]
SEEDED = importlib.util.find_spec("itmatch.features.detector.seeded") is not None


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32 on the GPU too (no TF32 matmuls / convolutions) while comparing with the CPU."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def config() -> dict:
    return load_config(REPO / "config" / "config.yaml")


def _on(d: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in d.items()}


def _detector(config: dict, tmp: Path) -> tuple[Path, dict, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    if SEEDED:
        from itmatch.features.detector.seeded import write_seeded_checkpoint

        cfg = detector_config(config["detector"], "coco")
        path = write_seeded_checkpoint(tmp / "seeded.pth", seed=0)
        images = [(rng.random((600, 1000, 3)) * 255).astype(np.uint8)]
    else:
        import sys

        sys.path.insert(0, str(REPO / "benchmarks"))
        from extract_bench import random_checkpoint

        cfg = detector_config(config["detector"], "shapes")
        path = tmp / "demo.pt"
        random_checkpoint(path, cfg, "demo")
        images = [(rng.random((160, 160, 3)) * 255).astype(np.uint8) for _ in range(4)]
    cfg = {**cfg, "inference": {**cfg["inference"], "precision": "fp32"}}
    return path, cfg, images


def test_region_extraction_cuda_matches_cpu(config, tmp_path):
    path, cfg, images = _detector(config, tmp_path)
    out = {}
    for dev in ("cpu", "cuda"):
        model, _ = load_detector(str(path), cfg, device=dev)
        pre = [preprocess(im, cfg) for im in images]
        with torch.inference_mode():
            out[dev] = detect(model, [x.to(dev) for x, _ in pre], [s for _, s in pre], [im.shape[:2] for im in images],
                              cfg)
    for a, b in zip(out["cpu"], out["cuda"], strict=True):
        assert len(a["features"]) == len(b["features"]) > 0
        best, j = box_iou(torch.as_tensor(a["boxes"]), torch.as_tensor(b["boxes"])).max(dim=1)
        assert (best >= 0.99).float().mean() >= 0.9, best  # (near-ties in NMS may swap a region or two)
        hit = best >= 0.99
        fa, fb = torch.as_tensor(a["features"])[hit], torch.as_tensor(b["features"])[j[hit]]
        assert (fa - fb).abs().max() <= 1e-3 * fa.abs().max() + 1e-5
        assert np.array_equal(np.asarray(a["object_id"])[hit.numpy()], np.asarray(b["object_id"])[j[hit].numpy()])


def _model(config: dict, name: str, direction: str | None, info: dict, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = model_settings(config, name, None)
    return build_model(name, part_config(cfg, direction if cfg.get("fuse") else None), info).to(device)


@pytest.mark.parametrize("name,direction", [("scan", "t2i"), ("scan", "i2t"), ("pfan", "t2i"), ("pfan", "i2t")])
def test_scoring_cuda_matches_cpu_and_bf16_stays_close(config, name, direction):
    images, captions, info = synthetic_batches(16, 80, seed=3)
    scores = {}
    for dev, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")):
        net = _model(config, name, direction, info, dev).eval()
        if precision == "bf16" and resolve_precision("auto", torch.device("cuda")) != "bf16":
            continue
        with torch.inference_mode(), autocast(dev, precision):
            s = net.score(net.encode_images(_on(images, dev)), net.encode_captions(_on(captions, dev)))
        scores[(dev, precision)] = s.float().cpu()
    ref = scores[("cpu", "fp32")]
    torch.testing.assert_close(scores[("cuda", "fp32")], ref, rtol=1e-4, atol=1e-5)
    if ("cuda", "bf16") in scores:  # docs/gpu.md: measured on CPU ≤ 3.8 % of the fp32 scores' spread
        assert (scores[("cuda", "bf16")] - ref).abs().max() <= 0.1 * ref.std()


@pytest.mark.parametrize("name", MODELS)
def test_training_step_cuda_matches_cpu(config, name):
    images, captions, info = synthetic_batches(16, 16, seed=4)
    crit = ContrastiveLoss(margin=0.2, max_violation=True)
    got = {}
    for dev in ("cpu", "cuda"):
        net = _model(config, name, "t2i", info, dev).train()
        torch.manual_seed(1)  # dropout / sampled negatives: the same stream on both (CPU generator)
        loss, _ = net.loss(_on(images, dev), _on(captions, dev), crit)
        loss.backward()
        got[dev] = (float(loss), {n: p.grad.detach().cpu() for n, p in net.named_parameters() if p.grad is not None})
    assert got["cuda"][0] == pytest.approx(got["cpu"][0], rel=1e-4, abs=1e-5)
    assert got["cpu"][1].keys() == got["cuda"][1].keys()
    for n, g in got["cpu"][1].items():
        assert (got["cuda"][1][n] - g).abs().max() <= 1e-3 * g.abs().max() + 1e-6, n


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_steps_run(config, precision):
    images, captions, info = _on_pair(synthetic_batches(16, 16, seed=5))
    for name in MODELS:
        net = _model(config, name, "t2i", info, "cuda").train()
        opt = torch.optim.Adam(net.parameters(), lr=2e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        with autocast("cuda", precision):
            loss, _ = net.loss(images, captions, ContrastiveLoss(margin=0.2, max_violation=True))
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 2.0)
        scaler.step(opt)
        scaler.update()
        assert torch.isfinite(loss), (name, precision)
        assert all(torch.isfinite(p).all() for p in net.parameters()), (name, precision)


def _on_pair(batches: tuple[dict, dict, dict]) -> tuple[dict, dict, dict]:
    images, captions, info = batches
    return _on(images, "cuda"), _on(captions, "cuda"), info
