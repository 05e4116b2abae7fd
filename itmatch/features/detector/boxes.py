"""Box arithmetic of the detector on top of ``torchvision.ops`` (NMS, IoU, clipping are torchvision's).

Two pixel conventions, chosen per architecture by ``box_convention``:

- ``legacy`` (caffe / bottom-up-attention, used for published checkpoints): a box ``(x1, y1, x2, y2)`` covers
  pixels ``x1..x2`` inclusive, so its width is ``x2 - x1 + 1``; boxes are clipped to ``[0, w - 1] × [0, h - 1]``;
  IoU counts the extra pixel too. Source: MILVLG/bottom-up-attention.pytorch 4dbce86,
  ``bua/caffe/modeling/box_regression.py`` (``TO_REMOVE = 1``) and ``layers/csrc/nms/nms_cpu.cpp``.
  torchvision's ``nms`` has no "+1": it gives the legacy result when ``x2`` and ``y2`` are passed plus 1
  (both then suppress on the same IoU, computed in a different order, so only exact ties at the threshold
  can differ; the legacy kernel also suppresses at IoU ``>=`` the threshold, torchvision at ``>``).
- ``continuous`` (detectron2's current convention, used by the demo detector): width ``x2 - x1``, clipped to
  ``[0, w] × [0, h]``.
"""

from __future__ import annotations

import math

import torch
from torchvision.ops import box_iou, clip_boxes_to_image, nms

BBOX_CLAMP = math.log(1000.0 / 16)  # largest dw/dh before exp (detectron2's and the reference's _DEFAULT_SCALE_CLAMP)
CONVENTIONS = ("legacy", "continuous")

__all__ = ["BBOX_CLAMP", "CONVENTIONS", "box_iou", "clip", "decode_boxes", "encode_boxes", "nms_boxes",
           "nms_in_input_order", "per_class_max_conf", "plus_one", "widths_heights"]


def plus_one(convention: str) -> float:
    """The extra pixel of a box's width in ``convention`` (1 for legacy, 0 for continuous)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"box_convention {convention!r}: expected one of {CONVENTIONS}")
    return 1.0 if convention == "legacy" else 0.0


def widths_heights(boxes: torch.Tensor, convention: str) -> tuple[torch.Tensor, torch.Tensor]:
    one = plus_one(convention)
    return boxes[:, 2] - boxes[:, 0] + one, boxes[:, 3] - boxes[:, 1] + one


def clip(boxes: torch.Tensor, h: int, w: int, convention: str) -> torch.Tensor:
    """Clip to the image: ``[0, w - 1] × [0, h - 1]`` (legacy) or ``[0, w] × [0, h]`` (torchvision's clipping)."""
    one = plus_one(convention)
    return clip_boxes_to_image(boxes, (h - one, w - one))


def nms_boxes(boxes: torch.Tensor, convention: str) -> torch.Tensor:
    """Boxes to hand to torchvision's ``nms`` / ``box_iou`` so that they measure IoU in ``convention``."""
    one = plus_one(convention)
    if one == 0:
        return boxes
    return torch.cat([boxes[:, :2], boxes[:, 2:] + one], dim=1)


def encode_boxes(src: torch.Tensor, dst: torch.Tensor, weights: tuple[float, float, float, float],
                 convention: str = "continuous") -> torch.Tensor:
    """Deltas ``(dx, dy, dw, dh)`` that turn ``src`` into ``dst`` (R-CNN parametrisation, scaled by weights)."""
    wx, wy, ww, wh = weights
    sw, sh = widths_heights(src, convention)
    sx, sy = src[:, 0] + 0.5 * sw, src[:, 1] + 0.5 * sh
    dw, dh = widths_heights(dst, convention)
    dx, dy = dst[:, 0] + 0.5 * dw, dst[:, 1] + 0.5 * dh
    return torch.stack([wx * (dx - sx) / sw, wy * (dy - sy) / sh,
                        ww * torch.log(dw / sw), wh * torch.log(dh / sh)], dim=1)


def decode_boxes(deltas: torch.Tensor, src: torch.Tensor, weights: tuple[float, float, float, float],
                 convention: str = "continuous") -> torch.Tensor:
    """Apply deltas ``[N, k·4]`` to boxes ``[N, 4]`` → boxes ``[N, k·4]``.

    Same operations in the same order as the reference's ``BUABox2BoxTransform.apply_deltas`` (legacy) and
    detectron2's ``Box2BoxTransform.apply_deltas`` (continuous), so float32 results agree bit for bit:
    centre ``x1 + w/2``, scale clamp at log(1000/16), corners ``centre ± w/2`` (no "−1" on x2 in either)."""
    deltas = deltas.float()
    src = src.to(deltas.dtype)
    w, h = widths_heights(src, convention)
    cx, cy = src[:, 0] + 0.5 * w, src[:, 1] + 0.5 * h
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=BBOX_CLAMP)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=BBOX_CLAMP)
    pcx, pcy = dx * w[:, None] + cx[:, None], dy * h[:, None] + cy[:, None]
    pw, ph = torch.exp(dw) * w[:, None], torch.exp(dh) * h[:, None]
    out = torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], dim=2)  # [N, k, 4]
    return out.reshape(deltas.shape)


def _nms_in_order(boxes: torch.Tensor, order: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision ``nms`` that visits ``boxes`` exactly in ``order`` (positions into ``boxes``): it is given the
    boxes in that order with strictly decreasing rank scores. → kept positions into ``boxes``."""
    ranks = torch.arange(len(order), 0, -1, dtype=torch.float32, device=boxes.device)
    return order[nms(boxes[order], ranks, iou_threshold)]


def nms_in_input_order(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                       convention: str) -> torch.Tensor:
    """Greedy NMS (torchvision ``nms``) as the reference's kernel (``nms_cpu.cpp``) runs it: boxes are visited in
    the order of ``scores.sort(0, descending=True)`` (the same, unstable, sort: boxes with equal scores are visited
    in the order that sort gives them, which matters when ROI pooling makes two proposals' scores identical);
    kept indices are returned in increasing index order (``nonzero`` of the not-suppressed mask)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.sort(0, descending=True)[1]
    return _nms_in_order(nms_boxes(boxes.float(), convention), order, iou_threshold).sort().values


def per_class_max_conf(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                       convention: str) -> torch.Tensor:
    """Bottom-up attention's region score: for each box, its highest class score among the classes in which it
    survives NMS over all boxes (``max_conf`` of the reference's ``save_roi_features``).

    boxes [P, 4], scores [P, C] (foreground classes) → max_conf [P] (0 where a box survives in no class).
    Per class, boxes are visited in the order of the reference kernel's ``sort(0, descending=True)`` of the
    class's scores (see :func:`nms_in_input_order`) and torchvision ``nms`` runs on the part of that order that
    can matter: a box's fate in greedy NMS depends only on the boxes visited before it, so the order is cut
    after the last box whose score could still raise its max_conf (classes with none are skipped). The result
    equals the full loop."""
    p, c = scores.shape
    best = torch.zeros(p, dtype=scores.dtype, device=scores.device)
    if p == 0:
        return best
    tv_boxes = nms_boxes(boxes.float(), convention)
    cols = scores.T.contiguous()  # [C, P]
    for k in torch.argsort(cols.amax(dim=1), descending=True).tolist():
        s = cols[k]
        raise_ = s > best
        if not bool(raise_.any()):
            continue
        sorted_s, order = s.sort(0, descending=True)
        n = int((sorted_s >= s[raise_].min()).sum())  # a prefix of the visiting order
        keep = _nms_in_order(tv_boxes, order[:n], iou_threshold)
        best[keep] = torch.maximum(best[keep], s[keep])
    return best
