"""Pairs/s of batched SCAN cross-attention scoring vs its GEMM floor and the per-caption loop reference.

    PYTHONPATH=. .venv/bin/python benchmarks/scoring_bench.py                  # both directions, 2 threads
    .venv/bin/python benchmarks/scoring_bench.py --direction t2i --images 512 --captions 512
    .venv/bin/python benchmarks/scoring_bench.py --device cuda --images 5000 --captions 25000  # COCO 5K matrix

Inputs are random l2-normalised region [I, R, d] and word [C, W, d] embeddings (all R regions; caption lengths
uniform in [W-4, W], so padding is exercised). For each direction (``--direction both``, the default, runs
t2i and i2t) it measures, best of ``--repeat`` (ours and the floor interleaved, so that a busy machine slows
both alike):

* ``ours``: :func:`itmatch.models.attention.t2i_scores` / ``i2t_scores`` on the I × C matrix;
* ``floor``: the bare logits GEMMs alone, torch.mm into one preallocated buffer, in exactly the shards and
  shapes ours runs (:func:`itmatch.models.attention.logits_gemm_shapes`; [m, d] × [d, n] per shard): the
  time no formulation that computes every word–region dot product can beat; ``ours/floor`` is the ratio of
  the pairs/s (1 = nothing but the GEMM);
* ``reference``: SCAN's released per-caption loop (``t2i_scores_reference`` / ``i2t_scores_reference``) on
  the first ``--ref-captions`` captions against all images (timed once), and the largest relative difference
  of ours from it on those pairs.

``GFLOP/s`` counts the logits GEMM's 2·I·R·C·W̄·d flops with W̄ the real mean caption length (``gemm_pad``:
the flops of the shards' padded shapes over that count); ``5K s`` is ours projected to COCO 5K's full
5,000 × 25,000 matrix (125 M pairs) from the measured pairs/s. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from itmatch.models.attention import (
    i2t_scores,
    i2t_scores_reference,
    logits_gemm_shapes,
    t2i_scores,
    t2i_scores_reference,
)
from itmatch.models.encoders import l2norm

COCO_5K_PAIRS = 5000 * 25000
FUNCS = {"t2i": (t2i_scores, t2i_scores_reference), "i2t": (i2t_scores, i2t_scores_reference)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--captions", type=int, default=1000)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--words", type=int, default=14, help="longest caption; lengths uniform in [W-4, W] (mean ~12)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--direction", choices=["t2i", "i2t", "both"], default="both")
    ap.add_argument("--ref-captions", type=int, default=20, help="captions scored by the reference loop")
    ap.add_argument("--max-elems", type=int, default=1 << 23)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--repeat", type=int, default=3, help="ours and the floor: best of this many runs")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    V = l2norm(torch.randn(a.images, a.regions, a.dim, generator=g)).to(dev)
    E = l2norm(torch.randn(a.captions, a.words, a.dim, generator=g)).to(dev)
    lens = torch.randint(max(1, a.words - 4), a.words + 1, (a.captions,), generator=g).to(dev)
    nreg = torch.full((a.images,), a.regions, dtype=torch.long, device=dev)
    Vd, Ed = V.to(dtype), E.to(dtype)
    pairs = a.images * a.captions
    mean_words = float(lens.float().mean())
    flops = 2 * a.images * float(nreg.float().mean()) * a.captions * mean_words * a.dim

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(f, *args, **kw) -> tuple[float, object]:
        sync()
        t0 = time.perf_counter()
        r = f(*args, **kw)
        sync()
        return time.perf_counter() - t0, r

    results = {}
    directions = ["t2i", "i2t"] if a.direction == "both" else [a.direction]
    with torch.no_grad():
        for direction in directions:
            fast, ref = FUNCS[direction]
            shapes = logits_gemm_shapes(direction, nreg, lens, max_elems=a.max_elems, device=dev)
            A = torch.randn(max(m for m, _ in shapes), a.dim, generator=g).to(dev, dtype)
            B = torch.randn(max(n for _, n in shapes), a.dim, generator=g).to(dev, dtype)
            buf = torch.empty(max(m * n for m, n in shapes), device=dev, dtype=dtype)

            def floor(A=A, B=B, buf=buf, shapes=shapes) -> None:
                for m, n in shapes:
                    torch.mm(A[:m], B[:n].t(), out=buf[: m * n].view(m, n))

            fast(Vd[:8], nreg[:8], Ed[:8], lens[:8], max_elems=a.max_elems)  # warm-up
            floor()
            t_ours = t_floor = float("inf")
            for _ in range(a.repeat):
                t, sim = timed(fast, Vd, nreg, Ed, lens, max_elems=a.max_elems)
                t_ours = min(t_ours, t)
                t_floor = min(t_floor, timed(floor)[0])
            nref = min(a.ref_captions, a.captions)
            t_ref, sim_ref = timed(ref, V, nreg, E[:nref], lens[:nref])
            err = ((sim[:, :nref].float() - sim_ref).abs() / sim_ref.abs().clamp(min=1e-6)).max().item()
            results[direction] = {
                "ours_pairs_per_s": round(pairs / t_ours), "ours_seconds": round(t_ours, 3),
                "floor_pairs_per_s": round(pairs / t_floor), "floor_seconds": round(t_floor, 3),
                "ours_over_floor": round(t_floor / t_ours, 3),
                "ours_gflops": round(flops / t_ours / 1e9, 1), "floor_gflops": round(flops / t_floor / 1e9, 1),
                "gemm_pad": round(sum(2 * m * n * a.dim for m, n in shapes) / flops, 3),
                "gemm_shards": len(shapes),
                "reference_pairs_per_s": round(a.images * nref / t_ref), "reference_pairs": a.images * nref,
                "speedup_over_reference": round(t_ref / (a.images * nref) * pairs / t_ours, 1),
                "coco5k_projected_seconds": round(COCO_5K_PAIRS * t_ours / pairs, 1),
                "max_rel_diff": err,
            }
    info = {"device": str(dev), "dtype": a.dtype, "threads": a.threads, "images": a.images,
            "captions": a.captions, "regions": a.regions, "dim": a.dim, "mean_words": round(mean_words, 3),
            "max_elems": a.max_elems, "repeat": a.repeat, "ref_captions": min(a.ref_captions, a.captions)}
    print(f"{a.images} images x {a.captions} captions, R={a.regions}, W<={a.words} (mean {mean_words:.2f}), "
          f"d={a.dim}, {a.dtype}, {a.device}, {a.threads} threads")
    print(f"{'dir':4} {'ours pairs/s':>13} {'floor pairs/s':>14} {'ours/floor':>11} {'ours GF/s':>10} "
          f"{'floor GF/s':>11} {'ref pairs/s':>12} {'x ref':>7} {'5K s':>8} {'max rel diff':>13}")
    for d, r in results.items():
        print(f"{d:4} {r['ours_pairs_per_s']:>13,} {r['floor_pairs_per_s']:>14,} {r['ours_over_floor']:>11.3f} "
              f"{r['ours_gflops']:>10.1f} {r['floor_gflops']:>11.1f} {r['reference_pairs_per_s']:>12,} "
              f"{r['speedup_over_reference']:>7.1f} {r['coco5k_projected_seconds']:>8.0f} {r['max_rel_diff']:>13.2e}")
    print(json.dumps({**info, **results}))


if __name__ == "__main__":
    main()
