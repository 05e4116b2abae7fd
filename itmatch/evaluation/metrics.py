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

The evaluation computes everything from the saved matrix (``sims.h5``) without loading it whole:
:func:`matrix_ranks` reads it in row blocks (two passes: the best positive of every image and every
caption's own score, then the counts) and keeps each query's top-k; :func:`evaluate_matrix` gives the
``protocols`` block together with every query's rank, in the whole matrix and in its fold. The in-memory
functions (:func:`i2t_ranks`, :func:`t2i_ranks`) are the reference the tests compare against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: rows [a, b) of a similarity matrix → float32 [b - a, C]
RowReader = Callable[[int, int], np.ndarray]

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


def metrics_from_ranks(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, Any]:
    """{'i2t': {...}, 't2i': {...}, 'rsum': ...} of 0-based ranks (images' and captions')."""
    a, b = summarize(i2t), summarize(t2i)
    return {"i2t": a, "t2i": b, "rsum": float(sum(a[f"r{k}"] for k in KS) + sum(b[f"r{k}"] for k in KS))}


def retrieval_metrics(sim: np.ndarray, cap_image: np.ndarray) -> dict[str, Any]:
    """{'i2t': {...}, 't2i': {...}, 'rsum': ...} for one similarity matrix."""
    return metrics_from_ranks(i2t_ranks(sim, cap_image), t2i_ranks(sim, cap_image))


def _check_folds(n_images: int, folds: int) -> int:
    if folds < 1 or n_images % folds:
        raise ValueError(f"{n_images} test images cannot be split into {folds} equal folds")
    return n_images // folds


def fold_columns(cap_image: np.ndarray, k: int, size: int) -> np.ndarray:
    """The captions (columns) of fold ``k``: those whose image row lies in ``[k·size, (k+1)·size)``."""
    return np.flatnonzero((cap_image >= k * size) & (cap_image < (k + 1) * size))


def mean_over_folds(per: list[dict[str, Any]]) -> dict[str, Any]:
    """Every number of the folds' metrics averaged (rSum: the mean of the folds' rSums); 'folds' recorded."""
    out: dict[str, Any] = {d: {m: float(np.mean([p[d][m] for p in per])) for m in per[0][d]}
                           for d in ("i2t", "t2i")}
    out["rsum"] = float(np.mean([p["rsum"] for p in per]))
    out["folds"] = len(per)
    return out


def fold_metrics(sim: np.ndarray, cap_image: np.ndarray, folds: int) -> dict[str, Any]:
    """Mean over ``folds`` consecutive equal image folds (each with its own captions); 'folds' recorded."""
    size = _check_folds(sim.shape[0], folds)
    per = []
    for k in range(folds):
        cols = fold_columns(cap_image, k, size)
        per.append(retrieval_metrics(sim[k * size:(k + 1) * size][:, cols], cap_image[cols] - k * size))
    return mean_over_folds(per)


def protocols(sim: np.ndarray, cap_image: np.ndarray, folds: int = 1, full: bool = False) -> dict[str, Any]:
    """The contract's ``protocols`` block: ``1k`` (``folds`` folds) and, when ``full``, ``5k`` (whole set)."""
    return evaluate_matrix(lambda a, b: np.asarray(sim[a:b]), sim.shape[0], cap_image, folds, full, top=0).protocols


# ---- row-block evaluation of a (saved) matrix ------------------------------------------------------------

@dataclass
class Ranks:
    """Every query's 0-based rank in one similarity matrix, the best true caption of every image and each
    query's ``k`` best candidates (score descending; equal scores: lower row / column first)."""

    i2t: np.ndarray            # [I] int64
    i2t_match: np.ndarray      # [I] int64: column of the image's best-scoring true caption
    t2i: np.ndarray            # [C] int64
    i2t_top: np.ndarray        # [I, k] int64 columns
    i2t_top_score: np.ndarray  # [I, k] float32
    t2i_top: np.ndarray        # [C, k] int64 rows
    t2i_top_score: np.ndarray  # [C, k] float32


def top_k(s: np.ndarray, k: int, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best entries of every row of ``s`` [n, m] as (``index`` of each, or its column; score), score
    descending, equal scores by smaller index first. A partition finds each row's k-th score; only the entries
    at least that high are sorted (all of them in a row of ties)."""
    n, m = s.shape
    idx = np.broadcast_to(np.arange(m), s.shape) if index is None else index
    if k >= m:
        order = np.lexsort((idx, -s), axis=-1) if n else np.zeros((0, m), np.int64)
        return np.take_along_axis(idx, order, 1).astype(np.int64), np.take_along_axis(s, order, 1)
    kth = np.partition(s, m - k, axis=1)[:, m - k:m - k + 1]
    r, c = np.nonzero(s >= kth)
    score, ids = s[r, c], idx[r, c]
    order = np.lexsort((ids, -score, r))
    r, score, ids = r[order], score[order], ids[order]
    keep = np.arange(len(r)) - np.searchsorted(r, np.arange(n))[r] < k  # the first k of every row
    return ids[keep].reshape(n, k).astype(np.int64), score[keep].reshape(n, k)


def block_rows(n_cols: int, elements: int = 1 << 22) -> int:
    """Rows per block so that a block holds about ``elements`` values (16 MB of float32)."""
    return max(1, elements // max(n_cols, 1))


def matrix_ranks(read: RowReader, n_images: int, cap_image: np.ndarray, top: int = 10,
                 block: int | None = None) -> Ranks:
    """:class:`Ranks` of an [n_images, C] matrix read ``block`` rows at a time (never whole): the same ranks as
    :func:`i2t_ranks` / :func:`t2i_ranks` (NaN ranks last, ties count against the model). Two passes: the
    first finds each image's best positive, each caption's own score and the top-k, the second counts, for
    every caption, the images scoring at least its own."""
    cap_image = np.asarray(cap_image, dtype=np.int64)
    C = len(cap_image)
    block = block or block_rows(C)
    k_i, k_t = min(top, C), min(top, n_images)
    i2t = np.zeros(n_images, np.int64)
    match = np.zeros(n_images, np.int64)
    i2t_top = np.zeros((n_images, k_i), np.int64)
    i2t_score = np.zeros((n_images, k_i), np.float32)
    pos = np.full(C, np.nan, np.float32)
    t_top = np.zeros((0, C), np.int64)
    t_score = np.zeros((0, C), np.float32)
    cols = np.arange(C)
    for a in range(0, n_images, block):
        s = _finite(np.asarray(read(a, min(n_images, a + block)), dtype=np.float32))
        b = a + s.shape[0]
        mine = (cap_image >= a) & (cap_image < b)
        gt = np.zeros(s.shape, dtype=bool)
        gt[cap_image[mine] - a, cols[mine]] = True
        if not gt.any(1).all():
            raise ValueError(f"image row {a + int(np.flatnonzero(~gt.any(1))[0])} has no caption")
        key = np.where(gt, s, -np.inf)
        best = key.max(1, keepdims=True)
        i2t[a:b] = ((s >= best) & ~gt).sum(1)
        match[a:b] = np.argmax(gt & (key == best), axis=1)
        pos[mine] = s[cap_image[mine] - a, cols[mine]]
        if k_i:
            i2t_top[a:b], i2t_score[a:b] = top_k(s, k_i)
        if k_t:  # the running top rows of every column merged with this block's rows
            cand = np.concatenate([t_top, np.broadcast_to(np.arange(a, b)[:, None], s.shape)], 0).T
            top, score = top_k(np.ascontiguousarray(np.concatenate([t_score, s], 0).T), k_t, cand)
            t_top, t_score = top.T, score.T
    if np.isnan(pos).any():
        raise ValueError(f"caption {int(np.flatnonzero(np.isnan(pos))[0])}: image row outside 0..{n_images - 1}")
    count = np.zeros(C, np.int64)
    for a in range(0, n_images, block):
        s = _finite(np.asarray(read(a, min(n_images, a + block)), dtype=np.float32))
        count += (s >= pos[None, :]).sum(0)
    return Ranks(i2t, match, count - 1, i2t_top, i2t_score, np.ascontiguousarray(t_top.T),
                 np.ascontiguousarray(t_score.T, dtype=np.float32))


@dataclass
class Evaluation:
    """The ``protocols`` block of a matrix, its :class:`Ranks` and every query's 0-based rank in its fold."""

    protocols: dict[str, Any]
    ranks: Ranks
    folds: int
    fold_i2t: np.ndarray  # [I]
    fold_t2i: np.ndarray  # [C]


def evaluate_matrix(read: RowReader, n_images: int, cap_image: np.ndarray, folds: int = 1, full: bool = False,
                    top: int = 10) -> Evaluation:
    """:func:`protocols` of an [n_images, C] matrix read in row blocks, with every query's ranks.

    Fold ``k`` (``folds`` > 1, COCO's 1K × 5) is rows ``[k·n/folds, (k+1)·n/folds)`` and the columns of their
    captions, the same numbers as the matrix's sub-block: each fold is ranked on its own, the whole matrix once
    more for ``5k`` and for the ranks and top-k reported per query."""
    cap_image = np.asarray(cap_image, dtype=np.int64)
    size = _check_folds(n_images, folds)
    whole = matrix_ranks(read, n_images, cap_image, top)
    if folds == 1:
        fold_i2t, fold_t2i = whole.i2t, whole.t2i
        per = [metrics_from_ranks(whole.i2t, whole.t2i)]
    else:
        fold_i2t = np.zeros(n_images, np.int64)
        fold_t2i = np.zeros(len(cap_image), np.int64)
        per = []
        for k in range(folds):
            off, cols = k * size, fold_columns(cap_image, k, size)
            r = matrix_ranks(lambda a, b, off=off, cols=cols: np.asarray(read(off + a, off + b))[:, cols], size,
                             cap_image[cols] - off, top=0)
            fold_i2t[off:off + size], fold_t2i[cols] = r.i2t, r.t2i
            per.append(metrics_from_ranks(r.i2t, r.t2i))
    prot = {"1k": mean_over_folds(per)}
    if full:
        prot["5k"] = metrics_from_ranks(whole.i2t, whole.t2i)
    return Evaluation(prot, whole, folds, fold_i2t, fold_t2i)
