"""Block-overlap index: hand-computed cases, a brute-force oracle, degenerate boxes, the HDF5 contract."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from itmatch.features.blocks import blocks_from_regions, compute_blocks, write_blocks


def brute_force(box, h, w, K, L):
    """Per-cell loop: overlap area of the clipped box with every cell, sorted by (-area, cell index)."""
    x1, y1, x2, y2 = (min(max(v, 0.0), lim) for v, lim in zip(box, (w, h, w, h), strict=True))
    areas = []
    for xc in range(K):
        for yc in range(K):
            ox = max(0.0, min(x2, (xc + 1) * w / K) - max(x1, xc * w / K))
            oy = max(0.0, min(y2, (yc + 1) * h / K) - max(y1, yc * h / K))
            areas.append((-round(ox * oy, 9), xc * K + yc))  # rounded: exact ties stay ties
    top = [(a, c) for a, c in sorted(areas) if a < 0][:L]
    total = -sum(a for a, _ in top)
    idx = [c for _, c in top] + [K * K] * (L - len(top))
    wt = [-a / total for a, _ in top] + [0.0] * (L - len(top))
    return idx, wt


def test_hand_computed():
    # 160×160 image, K=16 → 10 px cells. Box [0,0,20,10] covers cells (0,0) and (1,0) fully.
    idx, wt, bad = compute_blocks(np.array([[[0, 0, 20, 10]]], np.float32), np.array([[160, 160]]), K=16, L=4)
    assert idx.dtype == np.int16 and wt.dtype == np.float32 and bad == 0
    assert idx[0, 0].tolist() == [0, 16, 256, 256]  # cell = x_cell*K + y_cell
    np.testing.assert_allclose(wt[0, 0], [0.5, 0.5, 0, 0])
    # box [5,0,25,10]: x cells 0 (5 px), 1 (10 px), 2 (5 px) → cell 16 first, then 0 and 32 tied (lower first)
    idx, wt, _ = compute_blocks(np.array([[[5, 0, 25, 10]]], np.float32), np.array([[160, 160]]), K=16, L=3)
    assert idx[0, 0].tolist() == [16, 0, 32]
    np.testing.assert_allclose(wt[0, 0], [0.5, 0.25, 0.25])
    # non-square image (height 100, width 200), K=2: box in the lower-left quarter → x_cell 0, y_cell 1 → 1
    idx, wt, _ = compute_blocks(np.array([[[0, 60, 50, 100]]], np.float32), np.array([[100, 200]]), K=2, L=2)
    assert idx[0, 0].tolist() == [1, 4] and wt[0, 0].tolist() == [1.0, 0.0]


def test_matches_brute_force():
    rng = np.random.default_rng(0)
    N, R, K, L = 6, 7, 5, 6
    hw = np.stack([rng.integers(40, 90, N), rng.integers(40, 90, N)], 1)
    # grid-aligned integer boxes produce many ties; plus random real-valued ones, some beyond the border
    a = rng.integers(-10, 100, (N, R, 2)).astype(np.float32)
    b = a + rng.integers(1, 60, (N, R, 2))
    boxes = np.concatenate([a, b], -1)[..., [0, 1, 2, 3]]
    boxes[:, :3] = np.round(boxes[:, :3] / 10) * 10 + np.array([0, 0, 10, 10])
    idx, wt, _ = compute_blocks(boxes, hw, K, L)
    for n in range(N):
        for r in range(R):
            if (min(boxes[n, r, 2], hw[n, 1]) <= max(boxes[n, r, 0], 0)
                    or min(boxes[n, r, 3], hw[n, 0]) <= max(boxes[n, r, 1], 0)):
                continue  # degenerate: tested below
            ref_i, ref_w = brute_force(boxes[n, r].tolist(), hw[n, 0], hw[n, 1], K, L)
            assert idx[n, r].tolist() == ref_i, (n, r)
            np.testing.assert_allclose(wt[n, r], ref_w, rtol=1e-5, atol=1e-6)


def test_degenerate_and_padding_regions(caplog):
    boxes = np.array([[[5, 5, 5, 5],          # zero area → cell of its centre (0,0) = 0
                       [30, 10, 20, 40],      # x2 < x1 → centre (25, 25) → cell 1*4+1 = 5
                       [500, 500, 600, 600],  # outside → centre clipped to (100,100) → last cell 15
                       [np.nan, 0, 10, 10],   # non-finite → image centre → cell 2*4+2 = 10
                       [0, 0, 100, 100],      # whole image: valid
                       [0, 0, 0, 0]]], np.float32)  # past num_regions: padding, not counted
    idx, wt, bad = compute_blocks(boxes, np.array([[100, 100]]), K=4, L=3, num_regions=np.array([5]))
    assert bad == 4
    assert idx[0, :4, 0].tolist() == [0, 5, 15, 10]
    assert (wt[0, :4, 0] == 1).all() and (idx[0, :4, 1:] == 16).all() and (wt[0, :4, 1:] == 0).all()
    assert not np.isnan(wt).any()
    np.testing.assert_allclose(wt[0, 4], [1 / 3] * 3, rtol=1e-6)
    assert (idx[0, 5] == 16).all() and (wt[0, 5] == 0).all()


def test_write_and_from_regions(tmp_path):
    rng = np.random.default_rng(1)
    N, R = 5, 4
    hw = np.full((N, 2), 64, np.int32)
    xy = rng.uniform(0, 40, (N, R, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 24, (N, R, 2))], -1).astype(np.float32)
    with h5py.File(tmp_path / "regions.h5", "w") as f:
        f["image_id"] = np.arange(10, 10 + N, dtype=np.int64)
        f["boxes"] = boxes
        f["image_hw"] = hw
        f["num_regions"] = np.array([4, 4, 3, 4, 2], np.int16)
    blocks_from_regions(tmp_path / "regions.h5", tmp_path / "blocks.h5", K=8, L=5)
    with h5py.File(tmp_path / "blocks.h5", "r") as f:
        assert f.attrs["K"] == 8 and f.attrs["L"] == 5
        assert f["index"].dtype == np.int16 and f["index"].shape == (N, R, 5)
        assert f["weight"].dtype == np.float32 and f["index"].chunks == (1, R, 5)
        assert f["image_id"][:].tolist() == list(range(10, 15))
        w = f["weight"][:]
        np.testing.assert_allclose(w[0].sum(-1), 1, rtol=1e-6)
        assert (w[4, 2:] == 0).all() and (f["index"][4, 2:] == 64).all()
        want_index, want_weight, _ = compute_blocks(boxes, hw, 8, 5, np.array([4, 4, 3, 4, 2]))
        np.testing.assert_array_equal(f["index"][:], want_index)
        np.testing.assert_array_equal(w, want_weight)
    blocks_from_regions(tmp_path / "regions.h5", tmp_path / "chunked.h5", K=8, L=5, chunk=2)  # streamed in chunks
    with h5py.File(tmp_path / "blocks.h5", "r") as a, h5py.File(tmp_path / "chunked.h5", "r") as b:
        for name in ("image_id", "index", "weight"):
            np.testing.assert_array_equal(a[name][:], b[name][:])
    with pytest.raises(ValueError, match="inconsistent"):
        write_blocks(tmp_path / "x.h5", np.arange(2), np.zeros((3, 4, 5), np.int16), np.zeros((3, 4, 5)), 8, 5)
