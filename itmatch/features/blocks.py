"""Block-overlap index (PFAN §2.2, eq. 1–3): the L grid cells of a K×K split that each region overlaps most.

For every region box the image is split into K×K equal cells; cell (x_cell, y_cell) has index
``x_cell * K + y_cell`` (as in PFAN's released position files). The overlap of a box with a cell is the
intersecting area (eq. 2, continuous pixels); the L cells with the largest overlap are kept (ties broken
by the lower cell index), their areas normalised to sum 1 per region (eq. 3). Cells with zero overlap
(a box covering fewer than L cells) are padding: index K², weight 0.

Defined results for bad input (counted and logged, never NaN):
- boxes are clipped to the image first;
- a *degenerate* box (non-finite coordinates, x2 <= x1 or y2 <= y1 after clipping, or lying outside the
  image) gets the single cell containing its clipped centre (the image centre when the centre is not
  finite) with weight 1, the rest padding;
- regions past ``num_regions`` (zero rows in regions.h5) are all padding and are not counted.

Everything is vectorised over images and regions and processed in chunks of images, so COCO's 123k×36
boxes take seconds and memory stays bounded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import torch

from itmatch.utils.h5 import check_finite, checksum, open_h5, reading
from itmatch.utils.io import atomic_path

log = logging.getLogger(__name__)



def _axis_overlap(lo: torch.Tensor, hi: torch.Tensor, size: torch.Tensor, K: int) -> torch.Tensor:
    """Overlap length of [lo, hi] with the K cells of [0, size] along one axis. lo, hi: [n]; size: [n] → [n, K]."""
    edges = torch.arange(K + 1, dtype=torch.float64) / K  # [K+1]
    c_lo = edges[None, :-1] * size[:, None]  # [n, K]
    c_hi = edges[None, 1:] * size[:, None]
    return (torch.minimum(hi[:, None], c_hi) - torch.maximum(lo[:, None], c_lo)).clamp(min=0)


def _candidates(K: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank pairs (i, j), 0-based, with (i+1)(j+1) <= L: the only possible top-L products of two sorted lists."""
    pairs = [(i, j) for i in range(K) for j in range(K) if (i + 1) * (j + 1) <= L]
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def _blocks_chunk(boxes: np.ndarray, hw: np.ndarray, valid: np.ndarray, K: int, L: int
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """boxes [n,R,4], hw [n,2] (height, width), valid [n,R] bool → index int16 [n,R,L], weight float32, #degenerate."""
    n, R = boxes.shape[:2]
    b = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float64)).reshape(n * R, 4)
    H = torch.from_numpy(hw[:, 0].astype(np.float64)).repeat_interleave(R).clamp(min=1)  # [n*R]
    W = torch.from_numpy(hw[:, 1].astype(np.float64)).repeat_interleave(R).clamp(min=1)
    valid_t = torch.from_numpy(valid.reshape(-1))
    finite = torch.isfinite(b).all(dim=1)
    b = torch.where(finite[:, None], b, torch.zeros_like(b))
    x1, y1, x2, y2 = b.unbind(1)
    cx1, cx2 = torch.minimum(x1.clamp(min=0), W), torch.minimum(x2.clamp(min=0), W)
    cy1, cy2 = torch.minimum(y1.clamp(min=0), H), torch.minimum(y2.clamp(min=0), H)
    # overlaps in units of 2^-20 of a cell's width / height, rounded so that equal overlaps are exactly equal;
    # their products (areas in units of 2^-40 of a cell) are then exact integers in float64
    ox = torch.round(_axis_overlap(cx1, cx2, W, K) * (K * 2.0 ** 20 / W)[:, None])  # [n*R, K]
    oy = torch.round(_axis_overlap(cy1, cy2, H, K) * (K * 2.0 ** 20 / H)[:, None])
    degenerate = valid_t & (~finite | (ox.sum(1) <= 0) | (oy.sum(1) <= 0))
    # The area of cell (x, y) is ox[x]·oy[y]. Sort each axis (descending, lower index first on ties): the
    # top-L products lie among rank pairs (i, j) with (i+1)(j+1) <= L, so only those are candidates.
    # (integers from here: overlaps < 2^21, areas < 2^42, keys < 2^51, all exact in int64)
    sx, ix = torch.sort(ox.to(torch.int64), dim=1, descending=True, stable=True)
    sy, iy = torch.sort(oy.to(torch.int64), dim=1, descending=True, stable=True)
    pi, pj = _candidates(K, L)
    # candidates rank-pair-major ([M, n*R]: whole-row copies), then one unique int64 key each: the area, then the
    # lower cell index first; area and cell are decoded from the L largest keys
    sx, sy, ix, iy = (t.t().contiguous() for t in (sx, sy, ix, iy))
    key = (sx[pi] * sy[pj]) * (K * K + 1) + (K * K - (ix[pi] * K + iy[pj]))  # cell = x*K + y
    top_key = torch.topk(key.t(), min(L, key.shape[0]), dim=1).values  # [n*R, L'], descending
    top_area = top_key // (K * K + 1)
    top_cell = K * K - top_key % (K * K + 1)
    has = top_area > 0
    top_area = top_area.to(torch.float64)
    total = top_area.sum(1, keepdim=True).clamp(min=1e-30)
    weight = torch.where(has, top_area / total, torch.zeros_like(top_area))
    index = torch.where(has, top_cell, torch.full_like(top_cell, K * K))
    if index.shape[1] < L:  # more slots than cells: pad
        pad = L - index.shape[1]
        index = torch.cat([index, torch.full((n * R, pad), K * K, dtype=torch.int64)], 1)
        weight = torch.cat([weight, torch.zeros(n * R, pad, dtype=weight.dtype)], 1)
    # degenerate boxes: the cell of the clipped centre (image centre when not finite), weight 1
    if degenerate.any():
        cxm = torch.where(finite, ((x1 + x2) / 2).clamp(min=0), W / 2)
        cym = torch.where(finite, ((y1 + y2) / 2).clamp(min=0), H / 2)
        xc = torch.minimum(torch.floor(cxm * K / W), torch.full_like(cxm, K - 1)).to(torch.int64)
        yc = torch.minimum(torch.floor(cym * K / H), torch.full_like(cym, K - 1)).to(torch.int64)
        d = degenerate
        index[d] = K * K
        weight[d] = 0
        index[d, 0] = (xc * K + yc)[d]
        weight[d, 0] = 1.0
    index[~valid_t] = K * K
    weight[~valid_t] = 0
    return (index.reshape(n, R, L).numpy().astype(np.int16), weight.reshape(n, R, L).numpy().astype(np.float32),
            int(degenerate.sum()))


def compute_blocks(boxes: np.ndarray, image_hw: np.ndarray, K: int = 16, L: int = 15,
                   num_regions: np.ndarray | None = None, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, int]:
    """Block index for all regions of all images.

    boxes [N,R,4] (x1, y1, x2, y2 pixels), image_hw [N,2] (height, width), num_regions [N] or None
    → (index int16 [N,R,L], weight float32 [N,R,L], number of degenerate boxes).
    """
    boxes = np.asarray(boxes)
    image_hw = np.asarray(image_hw)
    if boxes.ndim != 3 or boxes.shape[2] != 4:
        raise ValueError(f"boxes must be [N,R,4], got shape {boxes.shape}")
    if image_hw.shape != (boxes.shape[0], 2):
        raise ValueError(f"image_hw must be [N,2] = [{boxes.shape[0]},2], got {image_hw.shape}")
    if K < 1 or L < 1 or K * K > 4096:
        raise ValueError(f"need K >= 1, L >= 1 and K² <= 4096, got K={K}, L={L}")
    N, R = boxes.shape[:2]
    valid = np.ones((N, R), dtype=bool) if num_regions is None else \
        np.arange(R)[None, :] < np.asarray(num_regions).reshape(N, 1)
    index = np.empty((N, R, L), dtype=np.int16)
    weight = np.empty((N, R, L), dtype=np.float32)
    n_bad = 0
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        index[s:e], weight[s:e], bad = _blocks_chunk(boxes[s:e], image_hw[s:e], valid[s:e], K, L)
        n_bad += bad
    return index, weight, n_bad


def _create_blocks(f: h5py.File, image_ids: np.ndarray, R: int, K: int, L: int) -> None:
    """The contract's datasets of blocks.h5 in an open file (``image_id`` int64 [N], ``index`` int16 [N,R,L],
    ``weight`` float32 [N,R,L], one image per chunk, checksums; attributes K, L), unfilled."""
    N = len(image_ids)
    f.create_dataset("image_id", data=np.asarray(image_ids, dtype=np.int64), **checksum((N,)))
    for name, dtype in (("index", np.int16), ("weight", np.float32)):
        f.create_dataset(name, shape=(N, R, L), dtype=dtype, chunks=(1, R, L) if N and R else None,
                         **checksum((N, R, L)))
    f.attrs["K"] = int(K)
    f.attrs["L"] = int(L)


def write_blocks(path: str | Path, image_ids: np.ndarray, index: np.ndarray, weight: np.ndarray, K: int, L: int
                 ) -> None:
    """Write blocks.h5 (:func:`_create_blocks`) from whole arrays, atomically."""
    N, R, Lw = index.shape
    if Lw != L or weight.shape != index.shape or len(image_ids) != N:
        raise ValueError(f"inconsistent shapes: index {index.shape}, weight {weight.shape}, "
                         f"image_ids {len(image_ids)}, L={L}")
    check_finite(weight.astype(np.float32), path, "weight", 0, np.asarray(image_ids))
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        _create_blocks(f, image_ids, R, K, L)
        if N:
            f["index"][:] = index.astype(np.int16)
            f["weight"][:] = weight.astype(np.float32)


def blocks_from_regions(regions_h5: str | Path, out: str | Path, K: int = 16, L: int = 15, chunk: int = 1024
                        ) -> int:
    """regions.h5 → blocks.h5, ``chunk`` images at a time (memory bounded by the chunk, not the dataset).
    Returns the number of degenerate boxes (logged)."""
    if K < 1 or L < 1 or K * K > 4096:
        raise ValueError(f"need K >= 1, L >= 1 and K² <= 4096, got K={K}, L={L}")
    n_bad = 0
    with open_h5(regions_h5) as f:
        for key in ("image_id", "boxes", "image_hw"):
            if key not in f:
                raise KeyError(f"{regions_h5}: dataset {key!r} missing (see the regions.h5 contract)")
        with reading(regions_h5, "image_id, num_regions"):
            image_ids = f["image_id"][:]
            nreg = f["num_regions"][:] if "num_regions" in f else None
        N, R = f["boxes"].shape[:2]
        with atomic_path(out) as tmp, h5py.File(tmp, "w") as g:
            _create_blocks(g, image_ids, R, K, L)
            for s in range(0, N, chunk):
                e = min(N, s + chunk)
                with reading(regions_h5, f"boxes of rows {s}..{e}"):
                    boxes, image_hw = f["boxes"][s:e], f["image_hw"][s:e]
                valid = (np.ones((e - s, R), dtype=bool) if nreg is None
                         else np.arange(R)[None, :] < nreg[s:e].reshape(-1, 1))
                index, weight, bad = _blocks_chunk(boxes, image_hw, valid, K, L)
                check_finite(weight, out, "weight", s, image_ids[s:e])
                g["index"][s:e] = index
                g["weight"][s:e] = weight
                n_bad += bad
    if n_bad:
        log.warning("%s: %d degenerate boxes (zero area, outside the image or non-finite) got the cell of "
                    "their centre", regions_h5, n_bad)
    log.info("blocks: %d images × %d regions, K=%d, L=%d", N, R, K, L)
    return n_bad
