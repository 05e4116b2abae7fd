"""Detector ops against straightforward reference computations: NMS, per-class NMS scores, ROI Align."""

from __future__ import annotations

import math

import pytest
import torch

from itmatch.features.detector.ops import (
    batched_nms,
    decode_boxes,
    encode_boxes,
    nms,
    per_class_nms_max_scores,
    roi_align,
)


def random_boxes(n: int, seed: int, size: float = 100.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * size / 3 + 2
    return torch.cat([xy, xy + wh], dim=1)


def iou_ref(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms_ref(boxes, scores, thr) -> list[int]:
    """Textbook greedy NMS: repeatedly keep the best remaining box, drop those overlapping it > thr."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    keep, removed = [], set()
    for i in order:
        if i in removed:
            continue
        keep.append(i)
        for j in order:
            if j not in removed and j != i and iou_ref(boxes[i].tolist(), boxes[j].tolist()) > thr:
                removed.add(j)
    return keep


@pytest.mark.parametrize("seed,n,thr", [(0, 50, 0.3), (1, 200, 0.5), (2, 300, 0.7), (3, 120, 0.1), (4, 1, 0.5)])
def test_nms_matches_reference(seed, n, thr):
    boxes = random_boxes(n, seed)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    assert nms(boxes, scores, thr).tolist() == nms_ref(boxes, scores, thr)


def test_nms_known_case():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # box 3 (best) suppresses 0 (IoU 0.9) and 1 (IoU 81/119 = 0.68 > 0.5); box 2 is apart
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert nms(boxes, scores, 0.95).tolist() == [3, 0, 1, 2]
    assert nms(boxes[:0], scores[:0], 0.5).numel() == 0


def test_batched_nms_is_per_class():
    boxes = random_boxes(150, 7)
    scores = torch.rand(150, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    labels = torch.randint(0, 4, (150,), generator=torch.Generator().manual_seed(9))
    got = set(batched_nms(boxes, scores, labels, 0.4).tolist())
    want = set()
    for c in range(4):
        idx = torch.nonzero(labels == c).squeeze(1)
        want |= {int(idx[k]) for k in nms_ref(boxes[idx], scores[idx], 0.4)}
    assert got == want


def test_per_class_nms_max_scores_matches_reference():
    boxes = random_boxes(60, 11)
    scores = torch.rand(60, 9, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    got = per_class_nms_max_scores(boxes, scores, 0.3, chunk=4)
    want = torch.zeros(60, dtype=torch.float64)
    for c in range(9):
        for i in nms_ref(boxes, scores[:, c], 0.3):
            want[i] = max(want[i], scores[i, c])
    assert torch.equal(got, want)


def bilinear_ref(feat, y, x):
    """torchvision/detectron2 ROIAlign bilinear sample (0 outside [-1, H] × [-1, W], else clamped)."""
    C, H, W = feat.shape
    if y < -1 or y > H or x < -1 or x > W:
        return torch.zeros(C, dtype=torch.float64)
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(math.floor(y)), int(math.floor(x))
    if yl >= H - 1:
        yl = yh = H - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= W - 1:
        xl = xh = W - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    return ((1 - ly) * (1 - lx) * feat[:, yl, xl] + (1 - ly) * lx * feat[:, yl, xh]
            + ly * (1 - lx) * feat[:, yh, xl] + ly * lx * feat[:, yh, xh])


def roi_align_ref(feat, box, S, scale, sr, mode="avg"):
    x1, y1, x2, y2 = [float(v) * scale - 0.5 for v in box]
    bw, bh = (x2 - x1) / S, (y2 - y1) / S
    out = torch.zeros(feat.shape[0], S, S, dtype=torch.float64)
    for ph in range(S):
        for pw in range(S):
            samples = [bilinear_ref(feat, y1 + ph * bh + (iy + 0.5) * bh / sr, x1 + pw * bw + (ix + 0.5) * bw / sr)
                       for iy in range(sr) for ix in range(sr)]
            stack = torch.stack(samples)
            out[:, ph, pw] = stack.max(dim=0).values if mode == "max" else stack.mean(dim=0)
    return out


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align_matches_reference(mode):
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    rois = [torch.tensor([[-10.0, -5, 40, 30], [3, 4, 60, 70], [100, 90, 190, 150], [170, 140, 176, 141]],
                         dtype=torch.float64),
            random_boxes(5, 3, size=150)]
    out = roi_align(feat, rois, 4, 1 / 16, 2, mode=mode)
    assert out.shape == (9, 3, 4, 4)
    k = 0
    for i, boxes in enumerate(rois):
        for box in boxes:
            torch.testing.assert_close(out[k], roi_align_ref(feat[i], box, 4, 1 / 16, 2, mode), rtol=0, atol=1e-12)
            k += 1


def test_roi_align_empty_image_and_gradient():
    feat = torch.randn(2, 4, 6, 6, requires_grad=True)
    out = roi_align(feat, [torch.zeros(0, 4), torch.tensor([[0.0, 0, 40, 40]])], 3, 1 / 8, 2)
    assert out.shape == (1, 4, 3, 3)
    out.sum().backward()
    assert feat.grad[0].abs().sum() == 0 and feat.grad[1].abs().sum() > 0


def test_box_coding_round_trip():
    src, dst = random_boxes(20, 5), random_boxes(20, 6)
    deltas = encode_boxes(src, dst, (10.0, 10.0, 5.0, 5.0))
    back = decode_boxes(deltas, src, (10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(back.double(), dst, rtol=1e-5, atol=1e-4)
