"""Detector box ops (torchvision underneath) against straightforward oracles written here: NMS in both pixel
conventions, bottom-up attention's per-class NMS score, ROI pooling, box coding, caffe anchors, resizing."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import roi_align, roi_pool

from itmatch.features.detector.boxes import (
    clip,
    decode_boxes,
    encode_boxes,
    nms_in_input_order,
    per_class_max_conf,
)
from itmatch.features.detector.inference import preprocess, resize_scale, select_rows
from itmatch.features.detector.rpn import AnchorGenerator, caffe_cell_anchors


def random_boxes(n: int, seed: int, size: float = 100.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * size / 3 + 2
    return torch.cat([xy, xy + wh], dim=1)


def iou_ref(a, b, one: float = 0.0) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + one)
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + one)
    inter = iw * ih
    union = (a[2] - a[0] + one) * (a[3] - a[1] + one) + (b[2] - b[0] + one) * (b[3] - b[1] + one) - inter
    return inter / union if union > 0 else 0.0


def nms_ref(boxes, scores, thr, legacy: bool = False) -> list[int]:
    """Textbook greedy NMS: repeatedly keep the best remaining box, drop those overlapping it above thr
    (legacy: caffe's kernel, "+1" areas and suppression at IoU >= thr). Kept indices, best first."""
    one = 1.0 if legacy else 0.0
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    keep, removed = [], set()
    for i in order:
        if i in removed:
            continue
        keep.append(i)
        for j in order:
            if j in removed or j == i:
                continue
            o = iou_ref(boxes[i].tolist(), boxes[j].tolist(), one)
            if (o >= thr) if legacy else (o > thr):
                removed.add(j)
    return keep


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("seed,n,thr", [(0, 50, 0.3), (1, 200, 0.5), (2, 300, 0.7), (3, 120, 0.1), (4, 1, 0.5)])
def test_nms_matches_reference(seed, n, thr, legacy):
    boxes = random_boxes(n, seed).float()
    scores = torch.rand(n, generator=torch.Generator().manual_seed(seed + 100))
    got = nms_in_input_order(boxes, scores, thr, "legacy" if legacy else "continuous").tolist()
    assert got == sorted(nms_ref(boxes.double(), scores, thr, legacy))


def test_nms_known_case():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # box 3 (best) suppresses 0 (IoU 0.9) and 1 (IoU 81/119 = 0.68 > 0.5); box 2 is apart
    assert nms_in_input_order(boxes, scores, 0.5, "continuous").tolist() == [2, 3]
    assert nms_in_input_order(boxes, scores, 0.95, "continuous").tolist() == [0, 1, 2, 3]
    # "+1" pixels: box 3 covers 11×10 of box 0's 11×11 pixels, IoU 110/121 = 0.909 (continuous: 0.9)
    assert nms_in_input_order(boxes, scores, 0.905, "legacy").tolist() == [1, 2, 3]
    assert nms_in_input_order(boxes, scores, 0.905, "continuous").tolist() == [0, 1, 2, 3]
    assert nms_in_input_order(boxes[:0], scores[:0], 0.5, "legacy").numel() == 0


@pytest.mark.parametrize("legacy", [False, True])
def test_per_class_max_conf_matches_the_full_loop(legacy):
    """The reference's loop: max_conf = max over classes of the class score where the box survives NMS."""
    boxes = random_boxes(60, 11).float()
    g = torch.Generator().manual_seed(12)
    scores = torch.softmax(torch.randn(60, 25, generator=g) * 3, dim=1)
    got = per_class_max_conf(boxes, scores, 0.3, "legacy" if legacy else "continuous")
    want = torch.zeros(60)
    for c in range(25):
        for i in nms_ref(boxes.double(), scores[:, c], 0.3, legacy):
            want[i] = max(want[i], scores[i, c])
    assert torch.equal(got, want)
    assert (got > 0).sum() > 30  # not trivially zero


def test_select_rows_follows_the_reference_rule():
    conf = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.25, 0.0])
    assert select_rows(conf, 0.2, 2, 4).tolist() == [1, 3, 4]  # 3 pass: proposal order
    assert select_rows(conf, 0.2, 4, 5).tolist() == [1, 3, 4, 0]  # too few: the best 4 by max_conf
    assert select_rows(conf, 0.2, 1, 2).tolist() == [1, 3]  # too many: the best 2
    assert select_rows(conf, 0.2, 3, 3).tolist() == [1, 3, 4]  # fixed 3, exactly 3 pass


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


def roi_align_ref(feat, box, S, scale, sr):
    x1, y1, x2, y2 = [float(v) * scale - 0.5 for v in box]
    bw, bh = (x2 - x1) / S, (y2 - y1) / S
    out = torch.zeros(feat.shape[0], S, S, dtype=torch.float64)
    for ph in range(S):
        for pw in range(S):
            samples = [bilinear_ref(feat, y1 + ph * bh + (iy + 0.5) * bh / sr, x1 + pw * bw + (ix + 0.5) * bw / sr)
                       for iy in range(sr) for ix in range(sr)]
            out[:, ph, pw] = torch.stack(samples).mean(dim=0)
    return out


def roi_pool_ref(feat, box, S, scale):
    """Caffe's ROIPool: box corners rounded on the map, ``+1`` size, bins floor/ceil, max (0 for empty bins)."""
    C, H, W = feat.shape
    x1, y1, x2, y2 = [round(float(v) * scale) for v in box]
    rw, rh = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
    out = torch.zeros(C, S, S, dtype=feat.dtype)
    for ph in range(S):
        hs = min(max(math.floor(ph * rh / S) + y1, 0), H)
        he = min(max(math.ceil((ph + 1) * rh / S) + y1, 0), H)
        for pw in range(S):
            ws = min(max(math.floor(pw * rw / S) + x1, 0), W)
            we = min(max(math.ceil((pw + 1) * rw / S) + x1, 0), W)
            if he > hs and we > ws:
                out[:, ph, pw] = feat[:, hs:he, ws:we].amax(dim=(1, 2))
    return out


def test_roi_align_matches_reference():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    rois = [torch.tensor([[-10.0, -5, 40, 30], [3, 4, 60, 70], [100, 90, 190, 150], [170, 140, 176, 141]],
                         dtype=torch.float64),
            random_boxes(5, 3, size=150)]
    out = roi_align(feat, rois, 4, 1 / 16, 2, aligned=True)
    assert out.shape == (9, 3, 4, 4)
    k = 0
    for i, boxes in enumerate(rois):
        for box in boxes:
            torch.testing.assert_close(out[k], roi_align_ref(feat[i], box, 4, 1 / 16, 2), rtol=0, atol=1e-12)
            k += 1


def test_roi_pool_is_caffe_roipool():
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(1, 4, 12, 15, generator=g)
    boxes = torch.cat([random_boxes(6, 4, size=200).float(), torch.tensor([[230.0, 180, 239, 191]])])
    out = roi_pool(feat, [boxes], 5, 1 / 16)
    for k, box in enumerate(boxes):
        torch.testing.assert_close(out[k], roi_pool_ref(feat[0], box, 5, 1 / 16), rtol=0, atol=0)


@pytest.mark.parametrize("convention", ["continuous", "legacy"])
def test_box_coding_round_trip(convention):
    src, dst = random_boxes(20, 5), random_boxes(20, 6)
    deltas = encode_boxes(src, dst, (10.0, 10.0, 5.0, 5.0), convention)
    back = decode_boxes(deltas, src, (10.0, 10.0, 5.0, 5.0), convention)
    # the reference's legacy decoding puts x2 at centre + w/2 (no "−1"), so it returns x2, y2 one pixel further
    shift = torch.tensor([0.0, 0, 1, 1], dtype=torch.float64) if convention == "legacy" else 0
    torch.testing.assert_close(back.double(), dst + shift, rtol=1e-5, atol=1e-4)


def test_legacy_decoding_and_clipping_use_plus_one_widths():
    box = torch.tensor([[10.0, 20.0, 19.0, 39.0]])  # 10 × 20 pixels
    out = decode_boxes(torch.tensor([[0.1, 0.0, math.log(2.0), 0.0]]), box, (1.0, 1.0, 1.0, 1.0), "legacy")
    # centre (15, 30) moves by 0.1 × 10; width doubles to 20 → x 6..26 (no "−1" on x2, as the reference)
    torch.testing.assert_close(out, torch.tensor([[6.0, 20.0, 26.0, 40.0]]))
    torch.testing.assert_close(clip(torch.tensor([[-3.0, -1, 70, 50]]), 40, 60, "legacy"),
                               torch.tensor([[0.0, 0, 59, 39]]))
    torch.testing.assert_close(clip(torch.tensor([[-3.0, -1, 70, 50]]), 40, 60, "continuous"),
                               torch.tensor([[0.0, 0, 60, 40]]))


def test_caffe_anchors_and_grid():
    """The 12 anchors of caffe's generate_anchors (base 16, ratios 0.5/1/2, scales 4..32), as listed in the
    bottom-up-attention prototxt's RPN (values from /work/shared/reference-notes.md, computed by caffe)."""
    want = [[-38, -16, 53, 31], [-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
            [-24, -24, 39, 39], [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
            [-14, -36, 29, 51], [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359]]
    base = caffe_cell_anchors(16, [0.5, 1.0, 2.0], [4, 8, 16, 32])
    assert base.tolist() == want
    grid = AnchorGenerator(base, 0.0)(2, 3, 16)
    assert grid.shape == (2 * 3 * 12, 4)
    assert grid[12 * 4 + 5].tolist() == [-56 + 16, -56 + 16, 71 + 16, 71 + 16]  # cell (y 1, x 1), anchor 5


def test_resize_scale_and_preprocess_follow_get_image_blob():
    assert resize_scale(480, 640, 600, 1000) == 600 / 480
    assert resize_scale(300, 1600, 600, 1000) == 1000 / 1600  # long side capped
    # 600/599 × 998.4 = 1000.07 → rounds to 1000, not above the cap: the short-side scale stays
    assert resize_scale(599, 998, 600, 1000) == 600 / 599
    assert resize_scale(599, 999, 600, 1000) == 1000 / 999  # 1000.67 rounds to 1001 > 1000
    cfg = {"inference": {"min_size": 600, "max_size": 1000},
           "input": {"format": "BGR", "pixel_mean": [102.9801, 115.9465, 122.7717], "pixel_std": [1.0, 1.0, 1.0]}}
    rgb = np.random.default_rng(0).integers(0, 256, (123, 77, 3), dtype=np.uint8)
    x, s = preprocess(rgb, cfg)
    bgr = rgb[:, :, ::-1].astype(np.float32)
    bgr -= np.array([[[102.9801, 115.9465, 122.7717]]])
    want = cv2.resize(bgr, None, None, fx=600 / 77, fy=600 / 77, interpolation=cv2.INTER_LINEAR)
    assert s == 600 / 77 and x.shape == (3, 958, 600)
    assert np.array_equal(x.permute(1, 2, 0).numpy(), want)


def nms_in_sort_order(boxes, scores, thr) -> list[int]:
    """The reference kernel's loop (legacy IoU, >=), visiting boxes in ``scores.sort(0, descending=True)`` order."""
    order = scores.sort(0, descending=True)[1].tolist()
    removed: set[int] = set()
    for a, i in enumerate(order):
        if i in removed:
            continue
        for j in order[a + 1:]:
            if j not in removed and iou_ref(boxes[i].tolist(), boxes[j].tolist(), 1.0) >= thr:
                removed.add(j)
    return sorted(set(range(len(scores))) - removed)


def test_tied_scores_are_visited_in_the_reference_sort_order():
    """Caffe's ROIPool rounds boxes to the feature grid, so nearby proposals can get identical features and
    identical scores; the box visited first among tied ones then survives. Ours follows the same sort."""
    boxes = random_boxes(80, 21, size=60).float()
    g = torch.Generator().manual_seed(22)
    scores = (torch.rand(80, 12, generator=g) * 8).floor() / 8  # many exact ties
    for c in range(12):
        assert nms_in_input_order(boxes, scores[:, c], 0.3, "legacy").tolist() == \
            nms_in_sort_order(boxes, scores[:, c], 0.3)
    want = torch.zeros(80)
    for c in range(12):
        for i in nms_in_sort_order(boxes, scores[:, c], 0.3):
            want[i] = max(want[i], scores[i, c])
    assert torch.equal(per_class_max_conf(boxes, scores, 0.3, "legacy"), want)
