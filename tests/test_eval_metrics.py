"""Retrieval metrics on hand-built similarity matrices with known ranks (1K, 5-fold, 5K)."""

from __future__ import annotations

import numpy as np
import pytest

from itmatch.evaluation.metrics import fold_metrics, i2t_ranks, protocols, retrieval_metrics, t2i_ranks


def test_ranks_and_metrics_exact():
    # 4 images, 2 captions each; explicit matrix.
    cap_image = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    sim = np.array([
        [9, 1, 0, 0, 0, 0, 0, 0],   # image 0: its caption 0 is top → rank 0
        [0, 0, 1, 0, 5, 5, 0, 0],   # image 1: best own 1, negatives 5,5 (and 1? no: col 3 is own) → rank 2
        [0, 0, 0, 0, 0, 0, 0, 0],   # image 2: all tied → 6 negatives ≥ → rank 6
        [8, 7, 6, 5, 4, 3, 2, 1],   # image 3: own best 2 (col 6) → negatives ≥ 2: 6 → rank 6
    ], dtype=float)
    np.testing.assert_array_equal(i2t_ranks(sim, cap_image), [0, 2, 6, 6])
    # t2i: column c, rank of its image = # other images with score ≥ (e.g. column 3: own 0, rows 0, 2, 3 tie/beat)
    np.testing.assert_array_equal(t2i_ranks(sim, cap_image), [0, 1, 1, 3, 3, 3, 0, 0])
    m = retrieval_metrics(sim, cap_image)
    assert m["i2t"] == {"r1": 25.0, "r5": 50.0, "r10": 100.0, "medr": 5.0, "meanr": 4.5}
    assert m["t2i"] == {"r1": 37.5, "r5": 100.0, "r10": 100.0, "medr": 2.0, "meanr": 2.375}
    assert m["rsum"] == 412.5


def test_five_fold_mean_and_5k():
    rng = np.random.default_rng(0)
    I, per = 10, 5
    cap_image = np.repeat(np.arange(I), per)
    # perfect within-fold diagonal except fold 1, which is all-tied (worst ranks)
    sim = rng.uniform(0, 1, (I, I * per))
    sim[cap_image, np.arange(I * per)] = 2.0
    sim[2:4, :] = 0.0
    sim[:, 10:20] = 0.0
    f = fold_metrics(sim, cap_image, folds=5)
    # fold 1 (images 2,3): i2t ranks = 5 negatives tied → 5 (R@1=0, R@5=0, R@10=100), t2i ranks = 1
    assert f["folds"] == 5
    assert f["i2t"]["r1"] == pytest.approx(80.0) and f["i2t"]["r5"] == pytest.approx(80.0)
    assert f["i2t"]["r10"] == 100.0
    assert f["t2i"]["r1"] == pytest.approx(80.0) and f["t2i"]["r5"] == 100.0
    assert f["i2t"]["medr"] == pytest.approx((1 * 4 + 6) / 5) and f["t2i"]["meanr"] == pytest.approx((4 + 2) / 5)
    folds_rsum = [600.0] * 4 + [0 + 0 + 100 + 0 + 100 + 100]
    assert f["rsum"] == pytest.approx(np.mean(folds_rsum))
    assert f["rsum"] == pytest.approx(sum(f[d][f"r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
    p = protocols(sim, cap_image, folds=5, full=True)
    full = p["5k"]
    # whole set: images 2,3 rows are all zero: 48 tied negatives → rank 48; columns 10-19 tied: rank 9
    assert full["i2t"]["r1"] == pytest.approx(80.0) and full["i2t"]["r10"] == pytest.approx(80.0)
    assert full["t2i"]["r1"] == pytest.approx(80.0) and full["t2i"]["r10"] == pytest.approx(100.0)
    assert full["t2i"]["meanr"] == pytest.approx((40 * 1 + 10 * 10) / 50)
    with pytest.raises(ValueError, match="equal folds"):
        fold_metrics(sim, cap_image, folds=3)


def test_single_1k_protocol_keys():
    cap_image = np.repeat(np.arange(3), 5)
    sim = np.eye(3).repeat(5, axis=1)
    p = protocols(sim, cap_image)
    assert set(p) == {"1k"} and p["1k"]["folds"] == 1 and p["1k"]["rsum"] == 600.0
    assert set(p["1k"]["i2t"]) == {"r1", "r5", "r10", "medr", "meanr"}
