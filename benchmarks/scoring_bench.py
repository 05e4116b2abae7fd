"""Pairs/s of batched SCAN cross-attention scoring vs the per-caption loop reference (equal sizes).

    .venv/bin/python benchmarks/scoring_bench.py --threads 2
    .venv/bin/python benchmarks/scoring_bench.py --device cuda --images 5000 --captions 25000  # COCO 5K matrix

Inputs are random l2-normalised region [I, R, d] and word [C, W, d] embeddings (caption lengths uniform in
[W-4, W], so padding is exercised); the reference is SCAN's released per-caption loop
(:func:`itmatch.models.attention.t2i_scores_reference`), run on ``--ref-captions`` captions against the same
images. Both in float32. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from itmatch.models.attention import i2t_scores, i2t_scores_reference, t2i_scores, t2i_scores_reference
from itmatch.models.encoders import l2norm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--captions", type=int, default=1000)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--words", type=int, default=14, help="longest caption; lengths uniform in [W-4, W] (mean ~12)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--direction", choices=["t2i", "i2t"], default="t2i")
    ap.add_argument("--ref-captions", type=int, default=50, help="captions scored by the reference loop")
    ap.add_argument("--max-elems", type=int, default=1 << 23)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    V = l2norm(torch.randn(a.images, a.regions, a.dim, generator=g)).to(dev)
    E = l2norm(torch.randn(a.captions, a.words, a.dim, generator=g)).to(dev)
    lens = torch.randint(max(1, a.words - 4), a.words + 1, (a.captions,), generator=g).to(dev)
    nreg = torch.full((a.images,), a.regions, dtype=torch.long, device=dev)
    fast, ref = (t2i_scores, t2i_scores_reference) if a.direction == "t2i" else (i2t_scores, i2t_scores_reference)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        fast(V[:8].to(dtype), nreg[:8], E[:8].to(dtype), lens[:8], max_elems=a.max_elems)  # warm-up
        best = float("inf")
        for _ in range(a.repeat):
            sync()
            t0 = time.perf_counter()
            sim = fast(V.to(dtype), nreg, E.to(dtype), lens, max_elems=a.max_elems)
            sync()
            best = min(best, time.perf_counter() - t0)
        nref = min(a.ref_captions, a.captions)
        sync()
        t0 = time.perf_counter()
        sim_ref = ref(V, nreg, E[:nref], lens[:nref])
        sync()
        t_ref = time.perf_counter() - t0
    err = ((sim[:, :nref].float() - sim_ref).abs() / sim_ref.abs().clamp(min=1e-6)).max().item()
    out = {"direction": a.direction, "device": str(dev), "dtype": a.dtype, "threads": a.threads,
           "images": a.images, "captions": a.captions, "regions": a.regions, "dim": a.dim,
           "mean_words": float(lens.float().mean()), "batched_seconds": round(best, 3),
           "batched_pairs_per_s": round(a.images * a.captions / best),
           "reference_pairs": a.images * nref, "reference_seconds": round(t_ref, 3),
           "reference_pairs_per_s": round(a.images * nref / t_ref),
           "speedup": round(t_ref / nref * a.captions / best, 1),
           "max_rel_diff": err}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
