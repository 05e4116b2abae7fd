"""Box operations in plain torch (no compiled extensions): IoU, box coding, NMS, ROI Align.

Boxes are ``[N, 4]`` float tensors ``(x1, y1, x2, y2)`` in pixels, continuous coordinates
(a box's width is ``x2 - x1``, as detectron2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BBOX_CLAMP = math.log(1000.0 / 16)  # largest dw/dh before exp (as detectron2)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix ``[len(a), len(b)]`` (0 where both areas are 0)."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def clip_boxes(boxes: torch.Tensor, h: float, w: float) -> torch.Tensor:
    x = boxes[..., 0::2].clamp(0, w)
    y = boxes[..., 1::2].clamp(0, h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def encode_boxes(src: torch.Tensor, dst: torch.Tensor, weights: tuple[float, float, float, float]) -> torch.Tensor:
    """Deltas ``(dx, dy, dw, dh)`` that turn ``src`` into ``dst`` (R-CNN parametrisation, scaled by weights)."""
    wx, wy, ww, wh = weights
    sw, sh = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
    sx, sy = src[:, 0] + 0.5 * sw, src[:, 1] + 0.5 * sh
    dw, dh = dst[:, 2] - dst[:, 0], dst[:, 3] - dst[:, 1]
    dx, dy = dst[:, 0] + 0.5 * dw, dst[:, 1] + 0.5 * dh
    return torch.stack([wx * (dx - sx) / sw, wy * (dy - sy) / sh,
                        ww * torch.log(dw / sw), wh * torch.log(dh / sh)], dim=1)


def decode_boxes(deltas: torch.Tensor, src: torch.Tensor, weights: tuple[float, float, float, float]) -> torch.Tensor:
    """Apply deltas ``[N, k*4]`` to boxes ``[N, 4]`` → boxes ``[N, k*4]``."""
    wx, wy, ww, wh = weights
    deltas = deltas.float()
    sw, sh = src[:, 2:3] - src[:, 0:1], src[:, 3:4] - src[:, 1:2]
    sx, sy = src[:, 0:1] + 0.5 * sw, src[:, 1:2] + 0.5 * sh
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=BBOX_CLAMP)
    dh = (deltas[:, 3::4] / wh).clamp(max=BBOX_CLAMP)
    cx, cy = dx * sw + sx, dy * sh + sy
    w, h = torch.exp(dw) * sw, torch.exp(dh) * sh
    out = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=2)  # [N, k, 4]
    return out.reshape(deltas.shape)


def _greedy_fixed_point(suppress: torch.Tensor) -> torch.Tensor:
    """Greedy NMS keep mask from ``suppress[..., k, i]`` = "k outranks i and overlaps it above the threshold".

    Greedy NMS is the unique ``keep`` with ``keep[i] = not any_k(keep[k] and suppress[k, i])``. Iterating that
    equation from all-True fixes one more rank per step at worst and stops at the greedy result (a fixed point
    is unique because rank 0 is always kept and each rank depends only on higher ranks). Typically a few steps.
    """
    keep = torch.ones(suppress.shape[:-1], dtype=torch.bool, device=suppress.device)
    s = suppress.to(torch.float32)
    for _ in range(suppress.shape[-1] + 1):
        new = torch.matmul(keep.to(torch.float32).unsqueeze(-2), s).squeeze(-2) == 0
        if torch.equal(new, keep):
            break
        keep = new
    return keep


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS. Returns kept indices sorted by decreasing score (ties: lower index first)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order].float()
    iou = box_iou(b, b)
    n = len(order)
    upper = torch.ones(n, n, dtype=torch.bool, device=b.device).triu(1)  # k outranks i  ⇔  k < i in sorted order
    keep = _greedy_fixed_point((iou > iou_threshold) & upper)
    return order[keep]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each group (class), boxes of different groups never suppress each other."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    offset = groups.to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offset, scores, iou_threshold)


def per_class_nms_max_scores(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                             chunk: int = 64) -> torch.Tensor:
    """Bottom-up attention's region score: for each box, the highest class score among the classes in which
    it survives NMS (all classes share the same boxes, the proposals).

    boxes [P, 4], scores [P, C] (foreground classes only) → max_conf [P]. Exact greedy NMS per class,
    computed for ``chunk`` classes at a time: "k outranks i in class c" is a score comparison (ties: lower index).
    """
    p, c = scores.shape
    overlap = box_iou(boxes.float(), boxes.float()) > iou_threshold  # [P, P]
    idx = torch.arange(p, device=boxes.device)
    tie = idx[:, None] < idx[None, :]
    best = torch.zeros(p, dtype=scores.dtype, device=scores.device)
    for start in range(0, c, chunk):
        s = scores[:, start:start + chunk].T  # [c', P]
        outranks = (s[:, :, None] > s[:, None, :]) | ((s[:, :, None] == s[:, None, :]) & tie)  # [c', k, i]
        keep = _greedy_fixed_point(outranks & overlap)
        best = torch.maximum(best, torch.where(keep, s, torch.zeros_like(s)).amax(dim=0))
    return best


def _bilinear_weights(coords: torch.Tensor, size: int) -> torch.Tensor:
    """1-D bilinear interpolation weights ``[R, n, size]`` of sample positions ``coords [R, n]`` (pixel units,
    pixel centres at integers) with ROIAlign's border rule: positions outside ``[-1, size]`` weigh 0, others are
    clamped into ``[0, size - 1]``."""
    valid = (coords >= -1) & (coords <= size)
    c = coords.clamp(0, size - 1)
    pix = torch.arange(size, dtype=coords.dtype, device=coords.device)
    w = (1 - (c.unsqueeze(-1) - pix).abs()).clamp(min=0)  # bilinear hat: 1-|c-p| for the two neighbours
    return w * valid.unsqueeze(-1).to(w.dtype)


def roi_align(features: torch.Tensor, rois: list[torch.Tensor], output_size: int, spatial_scale: float,
              sampling_ratio: int = 2, aligned: bool = True, mode: str = "avg") -> torch.Tensor:
    """ROI Align: features ``[B, C, H, W]``, per-image boxes (image pixels) → ``[R, C, S, S]``.

    Same arithmetic as detectron2/torchvision ROIAlign with a fixed ``sampling_ratio`` (sr×sr bilinear samples
    per bin, averaged; samples outside ``[-1, H] × [-1, W]`` count as 0, others are clamped into the map).
    The sample grid of a box is axis-aligned, so bilinear sampling is separable: samples = Wy · F · Wxᵀ with
    1-D interpolation matrices, two batched matmuls (cheap forward and backward on CPU and GPU; the same values
    as ``grid_sample`` at those points). ``mode="max"`` takes the maximum of each bin's samples instead (an
    ROIPool-like variant for caffe-converted checkpoints, which used max ROI pooling).
    """
    b, ch, h, w = features.shape
    out = []
    offset = 0.5 if aligned else 0.0
    sr = sampling_ratio
    n = output_size * sr
    cdt = torch.float64 if features.dtype == torch.float64 else torch.float32  # coordinate precision
    frac = (torch.arange(n, device=features.device, dtype=cdt) + 0.5) / sr  # in bin units
    for i, boxes in enumerate(rois):
        if len(boxes) == 0:
            continue
        bx = boxes.to(cdt) * spatial_scale - offset
        bw, bh = bx[:, 2] - bx[:, 0], bx[:, 3] - bx[:, 1]
        if not aligned:
            bw, bh = bw.clamp(min=1.0), bh.clamp(min=1.0)
        wy = _bilinear_weights(bx[:, 1:2] + frac[None] * (bh[:, None] / output_size), h).to(features.dtype)
        wx = _bilinear_weights(bx[:, 0:1] + frac[None] * (bw[:, None] / output_size), w).to(features.dtype)
        r = len(boxes)
        # [R·n, H] · [H, C·W] → [R, n·C, W] · [R, W, n] → [R, n, C, n] → [R, C, n, n]
        rows = (wy.reshape(r * n, h) @ features[i].permute(1, 0, 2).reshape(h, ch * w)).reshape(r, n * ch, w)
        sampled = torch.bmm(rows, wx.transpose(1, 2)).reshape(r, n, ch, n).permute(0, 2, 1, 3)
        pool = F.max_pool2d if mode == "max" else F.avg_pool2d
        out.append(pool(sampled, sr) if sr > 1 else sampled)
    if not out:
        return features.new_zeros((0, ch, output_size, output_size))
    return torch.cat(out)
