"""Region proposal network: anchors, head, proposals, and its training loss.

Objectness is a 2-way softmax per anchor as in the caffe-trained bottom-up-attention model: the head's
``objectness_logits`` has ``2A`` channels, the first ``A`` background, the last ``A`` foreground.
Anchor ``a`` at map cell ``(y, x)`` is centred at ``((x + offset)·stride, (y + offset)·stride)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from itmatch.features.detector.ops import box_iou, clip_boxes, decode_boxes, encode_boxes, nms


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
        """→ fg-minus-bg logits ``[B, H·W·A]``, deltas ``[B, H·W·A, 4]`` (anchor-major within each cell)."""
        t = F.relu(self.conv(x))
        logits = self.objectness_logits(t)
        b, a2, h, w = logits.shape
        a = a2 // 2
        fg_minus_bg = (logits[:, a:] - logits[:, :a]).permute(0, 2, 3, 1).reshape(b, h * w * a)
        deltas = self.anchor_deltas(t).reshape(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * a, 4)
        return fg_minus_bg, deltas


def cell_anchors(sizes: list[float], ratios: list[float]) -> torch.Tensor:
    """Anchors ``[A, 4]`` centred at 0: for each ratio (h/w), each size (sqrt of area)."""
    out = []
    for r in ratios:
        for s in sizes:
            w = s / r ** 0.5
            h = s * r ** 0.5
            out.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(out, dtype=torch.float32)


def grid_anchors(base: torch.Tensor, h: int, w: int, stride: int, offset: float) -> torch.Tensor:
    """All anchors ``[H·W·A, 4]`` of an ``h × w`` map, cell-major then anchor."""
    ys = (torch.arange(h, dtype=torch.float32, device=base.device) + offset) * stride
    xs = (torch.arange(w, dtype=torch.float32, device=base.device) + offset) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4)


class RPN(nn.Module):
    def __init__(self, cin: int, arch: dict):
        super().__init__()
        self.register_buffer("base_anchors", cell_anchors(arch["anchor_sizes"], arch["anchor_ratios"]),
                             persistent=False)
        self.rpn_head = RPNHead(cin, arch["rpn_channels"], len(self.base_anchors))
        self.offset = arch.get("anchor_offset", 0.5)
        self.weights = tuple(arch.get("rpn_box_reg_weights", [1.0, 1.0, 1.0, 1.0]))
        self.nms_thresh = arch.get("rpn_nms_thresh", 0.7)
        self.min_size = arch.get("rpn_min_size", 0.0)

    def forward(self, feats: torch.Tensor, image_hw: list[tuple[int, int]], stride: int, pre_nms: int,
                post_nms: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ proposals per image ``[≤post_nms, 4]`` (by objectness), logits, deltas, anchors (for the loss)."""
        logits, deltas = self.rpn_head(feats)
        anchors = grid_anchors(self.base_anchors, feats.shape[2], feats.shape[3], stride, self.offset)
        proposals = []
        with torch.no_grad():
            for i, (h, w) in enumerate(image_hw):
                k = min(pre_nms, logits.shape[1])
                scores, idx = logits[i].float().topk(k)
                boxes = clip_boxes(decode_boxes(deltas[i, idx], anchors[idx], self.weights), h, w)
                ok = ((boxes[:, 2] - boxes[:, 0]) > self.min_size) & ((boxes[:, 3] - boxes[:, 1]) > self.min_size)
                boxes, scores = boxes[ok], scores[ok]
                keep = nms(boxes, scores, self.nms_thresh)[:post_nms]
                proposals.append(boxes[keep])
        return proposals, logits, deltas, anchors


def rpn_loss(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, gt_boxes: list[torch.Tensor],
             weights: tuple[float, ...], batch_per_image: int = 256, positive_fraction: float = 0.5,
             fg_iou: float = 0.7, bg_iou: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Objectness (2-way softmax = logistic on fg−bg) and smooth-L1 box loss over sampled anchors."""
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
            target = encode_boxes(anchors, gt[which], weights)
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
