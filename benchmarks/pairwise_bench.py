"""Pairs/s of batched pairwise scoring: CAAN, BSSAN and SCAN (any registered model with ``--models``).

Random inputs shaped like the real ones (``--regions`` bottom-up regions of 2048-d, BSSAN's VGG-19 grid of
``--grid-cells`` × 512 for ``w2r_input: grid``, captions of ``--min-len``..``--max-len`` tokens); models built
from ``config/config.yaml`` (the papers' sizes, or a dataset's overrides with ``--dataset``) with random
weights, in eval mode under ``torch.inference_mode``.
Encoding is timed apart from scoring; ``pairs/s`` is I·C / scoring seconds (best of ``--repeat``).
With ``--train-batch B`` it also times one training step per model (``model.loss`` on B aligned pairs with
the shared hardest-negative criterion, forward + backward, train mode; best of ``--repeat``). Example::

    .venv/bin/python benchmarks/pairwise_bench.py --images 32 --captions 160 --threads 2 --train-batch 64
    .venv/bin/python benchmarks/pairwise_bench.py --dataset shapes --feature-dim 256 --vocab 60 --train-batch 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from itmatch.config import load_config
from itmatch.models.registry import build_model
from itmatch.training.settings import model_settings

REPO = Path(__file__).resolve().parents[1]
GRID_DIM = 512   # VGG-19 conv5_4 channels (BSSAN's W2R grid)


def make_inputs(n_img: int, n_cap: int, regions: int, feat: int, vocab: int, min_len: int, max_len: int,
                device: torch.device, seed: int = 0, grid_cells: int = 196) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    num = torch.randint(max(1, regions - 6), regions + 1, (n_img,), generator=g)
    valid = torch.arange(regions)[None] < num[:, None]
    images = {"features": torch.rand(n_img, regions, feat, generator=g) * valid[..., None],
              "num_regions": num, "object_conf": torch.rand(n_img, regions, generator=g) * valid,
              "boxes": torch.zeros(n_img, regions, 4), "index": torch.arange(n_img),
              "grid": torch.randn(n_img, grid_cells, GRID_DIM, generator=g).relu()}   # conv5_4 after its ReLU
    lens = torch.randint(min_len, max_len + 1, (n_cap,), generator=g)
    tok = torch.randint(1, vocab, (n_cap, max_len), generator=g)
    tok[torch.arange(max_len)[None] >= lens[:, None]] = 0
    captions = {"tokens": tok, "lengths": lens, "image_index": torch.arange(n_cap) % n_img,
                "index": torch.arange(n_cap)}
    move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return move(images), move(captions)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(name: str, cfg: dict, images: dict, captions: dict, data_info: dict, repeat: int,
          device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(name, cfg, data_info).to(device).eval()
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        img, cap = model.encode_images(images), model.encode_captions(captions)
        sync(device)
        t_enc = time.perf_counter() - t0
        model.score(img, cap)                          # warm-up
        best = float("inf")
        for _ in range(repeat):
            sync(device)
            t0 = time.perf_counter()
            sim = model.score(img, cap)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    n_pairs = sim.shape[0] * sim.shape[1]
    return {"model": name, "pairs": n_pairs, "score_s": round(best, 4), "pairs_per_s": round(n_pairs / best, 1),
            "encode_s": round(t_enc, 4), "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "pair_chunk": cfg.get("pair_chunk"), "device": str(device)}


def bench_train_step(name: str, cfg: dict, batch: int, regions: int, feat: int, vocab: int, min_len: int,
                     max_len: int, data_info: dict, repeat: int, device: torch.device) -> float:
    """Seconds of one training step (loss forward + backward, no optimizer step) on ``batch`` aligned pairs."""
    from itmatch.training.loss import ContrastiveLoss
    images, captions = make_inputs(batch, batch, regions, feat, vocab, min_len, max_len, device, seed=2)
    torch.manual_seed(0)
    model = build_model(name, cfg, data_info).to(device).train()
    criterion = ContrastiveLoss(margin=0.2, max_violation=True)
    best = float("inf")
    for _ in range(repeat + 1):                       # the first pass is a warm-up
        model.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        loss, _ = model.loss(images, captions, criterion)
        loss.backward()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return round(best, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["scan", "caan", "bssan"])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--captions", type=int, default=160)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--grid-cells", type=int, default=196, help="BSSAN's W2R grid cells (14 × 14 at 224 px)")
    ap.add_argument("--feature-dim", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--train-batch", type=int, default=0, help="also time a training step on B pairs (0: off)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    ap.add_argument("--dataset", help="apply models.<model>.datasets.<DATASET> (e.g. shapes: the demo's sizes)")
    ap.add_argument("--set", nargs="*", default=[], metavar="MODEL.KEY=VALUE",
                    help="override a model config value, e.g. caan.pair_chunk=1024 (parsed as JSON when possible)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = load_config(args.config)
    cfg_all = {m: model_settings(config, m, args.dataset) for m in config["models"]}
    for s in args.set:
        key, val = s.split("=", 1)
        model, k = key.split(".", 1)
        try:
            cfg_all[model][k] = json.loads(val)
        except json.JSONDecodeError:
            cfg_all[model][k] = val
    data_info = {"vocab_size": args.vocab, "feature_dim": args.feature_dim, "grid_dim": GRID_DIM}
    images, captions = make_inputs(args.images, args.captions, args.regions, args.feature_dim, args.vocab,
                                   args.min_len, args.max_len, device, grid_cells=args.grid_cells)
    rows = []
    for name in args.models:
        row = bench(name, dict(cfg_all[name]), images, captions, data_info, args.repeat, device)
        if args.train_batch:
            row["train_batch"] = args.train_batch
            row["train_step_s"] = bench_train_step(name, dict(cfg_all[name]), args.train_batch, args.regions,
                                                   args.feature_dim, args.vocab, args.min_len, args.max_len,
                                                   data_info, args.repeat, device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'model':8} {'pairs':>8} {'pairs/s':>12} {'score s':>9} {'encode s':>9} {'params M':>9} {'step s':>8}")
    for r in rows:
        print(f"{r['model']:8} {r['pairs']:8d} {r['pairs_per_s']:12.1f} {r['score_s']:9.3f} "
              f"{r['encode_s']:9.3f} {r['params_M']:9.2f} {r.get('train_step_s', float('nan')):8.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
