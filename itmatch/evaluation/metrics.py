"""The field's retrieval protocol on an [I, C] similarity matrix (rows = images, columns = captions).

- i2t (sentence retrieval): an image's rank is the best rank among its ground-truth captions;
- t2i (image retrieval): each caption's rank of its image;
- ranks are 0-based counts of *negatives scoring at least as high* as the positive (ties count against
  the model, so constant scores give the worst ranks, never perfect recall);
- R@K = % of queries with rank < K; medr = floor(median(rank)) + 1; meanr = mean(rank) + 1 (1-based);
- rSum = i2t R@1+R@5+R@10 + t2i R@1+R@5+R@10.

Protocols: ``1k`` with ``folds`` = 1 is the whole test set (Flickr30K's 1K, shapes); with ``folds`` = 5
(COCO) the test images are split into 5 consecutive folds of equal size with their captions, each fold is
scored separately and every number — recalls, medr, meanr and rSum — is the mean over the folds (so rSum
is the mean of the folds' rSums, not the sum of the last fold's recalls). ``5k`` is the full test set.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KS = (1, 5, 10)


def _finite(sim: np.ndarray) -> np.ndarray:
    """NaN scores rank last (a diverged model must not look perfect: NaN comparisons are all False)."""
    return np.nan_to_num(sim, nan=-np.inf) if np.isnan(sim).any() else sim


def i2t_ranks(sim: np.ndarray, cap_image: np.ndarray) -> np.ndarray:
    """sim [I, C], cap_image [C] (row of each caption's image in sim) → [I] 0-based ranks."""
    sim = _finite(sim)
    I, C = sim.shape
    gt = np.zeros((I, C), dtype=bool)
    gt[cap_image, np.arange(C)] = True
    if not gt.any(1).all():
        raise ValueError(f"{int((~gt.any(1)).sum())} images have no caption")
    best = np.where(gt, sim, -np.inf).max(1, keepdims=True)  # [I, 1] best positive score
    return ((sim >= best) & ~gt).sum(1)


def t2i_ranks(sim: np.ndarray, cap_image: np.ndarray) -> np.ndarray:
    """→ [C] 0-based rank of each caption's image among all images."""
    sim = _finite(sim)
    C = sim.shape[1]
    pos = sim[cap_image, np.arange(C)]  # [C]
    return (sim >= pos[None, :]).sum(0) - 1


def summarize(ranks: np.ndarray) -> dict[str, float]:
    ranks = np.asarray(ranks)
    out = {f"r{k}": float(100.0 * (ranks < k).mean()) for k in KS}
    out["medr"] = float(np.floor(np.median(ranks)) + 1)
    out["meanr"] = float(ranks.mean() + 1)
    return out


def retrieval_metrics(sim: np.ndarray, cap_image: np.ndarray) -> dict[str, Any]:
    """{'i2t': {...}, 't2i': {...}, 'rsum': ...} for one similarity matrix."""
    i2t = summarize(i2t_ranks(sim, cap_image))
    t2i = summarize(t2i_ranks(sim, cap_image))
    rsum = sum(i2t[f"r{k}"] for k in KS) + sum(t2i[f"r{k}"] for k in KS)
    return {"i2t": i2t, "t2i": t2i, "rsum": float(rsum)}


def fold_metrics(sim: np.ndarray, cap_image: np.ndarray, folds: int) -> dict[str, Any]:
    """Mean over ``folds`` consecutive equal image folds (each with its own captions); 'folds' recorded."""
    I = sim.shape[0]
    if folds < 1 or I % folds:
        raise ValueError(f"{I} test images cannot be split into {folds} equal folds")
    size = I // folds
    per = []
    for k in range(folds):
        cols = np.flatnonzero((cap_image >= k * size) & (cap_image < (k + 1) * size))
        per.append(retrieval_metrics(sim[k * size:(k + 1) * size][:, cols], cap_image[cols] - k * size))
    out: dict[str, Any] = {d: {m: float(np.mean([p[d][m] for p in per])) for m in per[0][d]}
                           for d in ("i2t", "t2i")}
    out["rsum"] = float(np.mean([p["rsum"] for p in per]))
    out["folds"] = folds
    return out


def protocols(sim: np.ndarray, cap_image: np.ndarray, folds: int = 1, full: bool = False) -> dict[str, Any]:
    """The contract's ``protocols`` block: ``1k`` (``folds`` folds) and, when ``full``, ``5k`` (whole set)."""
    out = {"1k": fold_metrics(sim, cap_image, folds)}
    if full:
        out["5k"] = retrieval_metrics(sim, cap_image)
    return out
