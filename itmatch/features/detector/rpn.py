"""Region proposal network: anchors, head, proposals, and its training loss.

Objectness is a 2-way softmax per anchor as in the caffe-trained bottom-up-attention model: the head's
``objectness_logits`` has ``2A`` channels, the first ``A`` background, the last ``A`` foreground; a proposal's
score is the foreground probability. Anchor ``a`` at map cell ``(y, x)`` is cell anchor ``a`` shifted by
``(offset·stride + x·stride, offset·stride + y·stride)``, cell-major then anchor (detectron2's
``DefaultAnchorGenerator``).

Test-time proposals follow the reference (MILVLG/bottom-up-attention.pytorch 4dbce86,
``bua/caffe/modeling/rpn_outputs.py``, ``find_top_bua_rpn_proposals``): decode every anchor, clip to the
image, drop boxes with ``x2 <= x1`` or ``y2 <= y1`` and boxes whose side is not above ``rpn_min_size × scale``,
sort by score, keep the best ``pre_nms``, NMS (torchvision) at ``rpn_nms_thresh``, keep the first ``post_nms``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from itmatch.features.detector.boxes import box_iou, clip, decode_boxes, encode_boxes, nms_in_input_order


class RPNHead(nn.Module):
    def __init__(self, cin: int, channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(channels, 2 * num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(channels, 4 * num_anchors, 1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """→ raw objectness logits ``[B, 2A, H, W]`` (bg then fg), deltas ``[B, H·W·A, 4]`` (cell-major, anchor)."""
        t = F.relu(self.conv(x))
        logits = self.objectness_logits(t)
        d = self.anchor_deltas(t)
        b, a4, h, w = d.shape
        return logits, d.view(b, a4 // 4, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * (a4 // 4), 4)


def fg_probability(logits: torch.Tensor) -> torch.Tensor:
    """Foreground probability ``[B, H·W·A]`` of raw logits ``[B, 2A, H, W]``: softmax over (bg, fg) per anchor
    (the reference's ``predict_objectness_logits``, which returns this probability)."""
    b, a2, h, w = logits.shape
    p = F.softmax(logits.view(b, 2, a2 // 2, h, w), dim=1)[:, 1:]
    return p.permute(0, 3, 4, 1, 2).reshape(b, -1)


def fg_minus_bg(logits: torch.Tensor) -> torch.Tensor:
    """``fg − bg`` logit ``[B, H·W·A]`` (the 2-way softmax as a logistic, for the training loss)."""
    b, a2, h, w = logits.shape
    a = a2 // 2
    return (logits[:, a:] - logits[:, :a]).permute(0, 2, 3, 1).reshape(b, h * w * a)


def cell_anchors(sizes: list[float], ratios: list[float]) -> torch.Tensor:
    """Exact-ratio anchors ``[A, 4]`` centred at 0: for each ratio (h/w), each size (sqrt of area)."""
    out = []
    for r in ratios:
        for s in sizes:
            w = s / r ** 0.5
            h = s * r ** 0.5
            out.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(out, dtype=torch.float32)


def caffe_cell_anchors(base_size: int, ratios: list[float], scales: list[float]) -> torch.Tensor:
    """Anchors ``[A, 4]`` of caffe Faster R-CNN's ``generate_anchors`` (py-faster-rcnn ``lib/rpn/generate_anchors.py``,
    used by the bottom-up-attention prototxt with base 16, ratios 0.5/1/2, scales 4/8/16/32): ratio-major; the
    ``base_size``² box centred at ``(base_size − 1)/2`` is reshaped to each ratio with whole-pixel sides
    (``round(sqrt(area/ratio))``, numpy's half-to-even rounding), then scaled; corners ``centre ± (side − 1)/2``."""
    ctr = (base_size - 1) / 2.0
    out = []
    for r in ratios:
        w = float(np.round(np.sqrt(base_size * base_size / r)))
        h = float(np.round(w * r))
        for s in scales:
            ws, hs = w * s, h * s
            out.append([ctr - 0.5 * (ws - 1), ctr - 0.5 * (hs - 1), ctr + 0.5 * (ws - 1), ctr + 0.5 * (hs - 1)])
    return torch.tensor(out, dtype=torch.float32)


def anchors_from_config(arch: dict) -> torch.Tensor:
    """Cell anchors of ``arch``: ``anchor_style: caffe`` (base size, ratios, scales) or ``sizes`` (the default)."""
    style = arch.get("anchor_style", "sizes")
    if style == "caffe":
        return caffe_cell_anchors(arch.get("anchor_base_size", 16), arch["anchor_ratios"], arch["anchor_scales"])
    if style == "sizes":
        return cell_anchors(arch["anchor_sizes"], arch["anchor_ratios"])
    raise ValueError(f"detector architecture: anchor_style {style!r} is not 'caffe' or 'sizes'")


class AnchorGenerator(nn.Module):
    """Cell anchors as a persistent buffer ``cell_anchors.0`` (the state-dict key of detectron2's generator, so a
    checkpoint's stored anchors replace the configured ones, as in the reference) and the grid offset."""

    def __init__(self, base: torch.Tensor, offset: float):
        super().__init__()
        self.cell_anchors = nn.Module()
        self.cell_anchors.register_buffer("0", base)
        self.offset = offset

    @property
    def base(self) -> torch.Tensor:
        return getattr(self.cell_anchors, "0")

    def forward(self, h: int, w: int, stride: int) -> torch.Tensor:
        """All anchors ``[h·w·A, 4]`` of an ``h × w`` map (same arithmetic as detectron2's ``_grid_anchors``)."""
        base = self.base
        xs = torch.arange(self.offset * stride, w * stride, step=stride, dtype=torch.float32, device=base.device)
        ys = torch.arange(self.offset * stride, h * stride, step=stride, dtype=torch.float32, device=base.device)
        sy, sx = torch.meshgrid(ys, xs, indexing="ij")
        sx, sy = sx.reshape(-1), sy.reshape(-1)
        shifts = torch.stack((sx, sy, sx, sy), dim=1)
        return (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)


class RPN(nn.Module):
    def __init__(self, cin: int, arch: dict):
        super().__init__()
        self.anchor_generator = AnchorGenerator(anchors_from_config(arch), arch.get("anchor_offset", 0.5))
        self.rpn_head = RPNHead(cin, arch["rpn_channels"], len(self.anchor_generator.base))
        self.weights = tuple(arch.get("rpn_box_reg_weights", [1.0, 1.0, 1.0, 1.0]))
        self.nms_thresh = arch.get("rpn_nms_thresh", 0.7)
        self.min_size = arch.get("rpn_min_size", 0.0)
        self.convention = arch.get("box_convention", "continuous")

    def forward(self, feats: torch.Tensor, image_hw: list[tuple[int, int]], scales: list[float], stride: int,
                pre_nms: int, post_nms: int) -> dict:
        """→ {"proposals": per image ``[≤post_nms, 4]`` (resized-image pixels), "scores": their fg probability,
        "logits": raw ``[B, 2A, H, W]``, "deltas": ``[B, H·W·A, 4]``, "anchors": ``[H·W·A, 4]``}."""
        logits, deltas = self.rpn_head(feats)
        anchors = self.anchor_generator(feats.shape[2], feats.shape[3], stride)
        proposals, scores_out = [], []
        with torch.no_grad():
            probs = fg_probability(logits.float())
            boxes_all = decode_boxes(deltas.float().reshape(-1, 4), anchors.repeat(len(feats), 1), self.weights,
                                     self.convention).view(len(feats), -1, 4)
            for i, (h, w) in enumerate(image_hw):
                boxes = clip(boxes_all[i], h, w, self.convention)
                scores = probs[i]
                ok = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
                boxes, scores = boxes[ok], scores[ok]
                one = 1.0 if self.convention == "legacy" else 0.0
                min_side = self.min_size * scales[i]
                ok = (boxes[:, 2] - boxes[:, 0] + one > min_side) & (boxes[:, 3] - boxes[:, 1] + one > min_side)
                if not bool(ok.all()):
                    boxes, scores = boxes[ok], scores[ok]
                scores, order = scores.sort(descending=True, dim=0)
                k = min(pre_nms, len(scores))
                boxes, scores = boxes[order[:k]], scores[:k]
                keep = nms_in_input_order(boxes, scores, self.nms_thresh, self.convention)[:post_nms]
                proposals.append(boxes[keep])
                scores_out.append(scores[keep])
        return {"proposals": proposals, "scores": scores_out, "logits": logits, "deltas": deltas,
                "anchors": anchors}


def rpn_loss(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, gt_boxes: list[torch.Tensor],
             weights: tuple[float, ...], batch_per_image: int = 256, positive_fraction: float = 0.5,
             fg_iou: float = 0.7, bg_iou: float = 0.3,
             convention: str = "continuous") -> tuple[torch.Tensor, torch.Tensor]:
    """Objectness (2-way softmax = logistic on fg−bg) and smooth-L1 box loss over sampled anchors.
    ``logits``: the head's raw ``[B, 2A, H, W]``."""
    logits = fg_minus_bg(logits)
    labels_all, targets_all, sel_all = [], [], []
    for i, gt in enumerate(gt_boxes):
        labels = torch.zeros(len(anchors), dtype=torch.float32, device=anchors.device)
        target = torch.zeros_like(anchors)
        if len(gt):
            iou = box_iou(gt, anchors)  # [G, N]
            best, which = iou.max(dim=0)
            labels = torch.full_like(best, -1.0)
            labels[best < bg_iou] = 0
            labels[best >= fg_iou] = 1
            top = iou.max(dim=1, keepdim=True).values
            labels[((iou == top) & (top > 0)).any(dim=0)] = 1  # each gt's best anchors
            target = encode_boxes(anchors, gt[which], weights, convention)
        pos = torch.nonzero(labels == 1).squeeze(1)
        neg = torch.nonzero(labels == 0).squeeze(1)
        n_pos = min(len(pos), int(batch_per_image * positive_fraction))
        pos = pos[torch.randperm(len(pos), device=pos.device)[:n_pos]]
        neg = neg[torch.randperm(len(neg), device=neg.device)[:batch_per_image - n_pos]]
        sel = torch.cat([pos, neg])
        labels_all.append(labels[sel])
        targets_all.append(target[pos])
        sel_all.append((i, sel, pos))
    obj = torch.cat([logits[i, sel] for i, sel, _ in sel_all])
    n = max(1, len(obj))
    cls_loss = F.binary_cross_entropy_with_logits(obj, torch.cat(labels_all), reduction="sum") / n
    pred = torch.cat([deltas[i, pos] for i, _, pos in sel_all])
    box_loss = F.smooth_l1_loss(pred, torch.cat(targets_all), beta=1 / 9, reduction="sum") / n
    return cls_loss, box_loss
