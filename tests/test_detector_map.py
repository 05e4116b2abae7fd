"""The detector's mAP (pycocotools) against hand-computed values and against our former VOC-style AP code, kept
here as an independent cross-check.

Why the two AP@0.5 values differ, and by how much: both match detections the same way (greedy by score, best
unmatched ground truth with IoU ≥ 0.5) and take the same monotone precision envelope q(r). VOC's all-point AP
is the area under q; COCO's is the mean of q at the 101 recall points 0, 0.01, …, 1. For a non-increasing
step function q on [0, 1], (q(0) + Σ_{i=1..100} q(i/100)) / 101 − ∫q lies in [−0.01, 1/101]: a right Riemann
sum is below the integral by at most 0.01·(q(0) − q(1)), and the extra q(0) sample adds at most 1/101. So per
class (and for the mean) |COCO − VOC| ≤ 1/101 < 0.01, the tolerance used below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from itmatch.features.detector.evaluate import coco_ap, mean_ap

TOL = 1 / 101  # see the module docstring


# ---------------------------------------------------------------- the former implementation (VOC all-point AP)


def voc_average_precision(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> float:
    """VOC all-point interpolated AP of ranked detections."""
    if n_gt == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    tp = tp[order].astype(np.float64)
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    recall = ctp / n_gt
    precision = ctp / np.maximum(ctp + cfp, 1e-12)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def voc_match(det_boxes: np.ndarray, det_scores: np.ndarray, gt_boxes: np.ndarray, thr: float = 0.5) -> np.ndarray:
    """True-positive flags of one image's detections (one class), greedy by score."""
    tp = np.zeros(len(det_boxes), dtype=bool)
    if len(gt_boxes) == 0 or len(det_boxes) == 0:
        return tp
    iou = box_iou(torch.as_tensor(det_boxes, dtype=torch.float32),
                  torch.as_tensor(gt_boxes, dtype=torch.float32)).numpy()
    used = np.zeros(len(gt_boxes), dtype=bool)
    for d in np.argsort(-det_scores, kind="stable"):
        cand = np.where(used, -1.0, iou[d])
        g = int(np.argmax(cand))
        if cand[g] >= thr:
            used[g] = True
            tp[d] = True
    return tp


def voc_class_ap(dets: list[dict], gts: list[dict], c: int) -> float:
    scores, tps, n_gt = [], [], 0
    for d, g in zip(dets, gts, strict=True):
        gm, dm = g["labels"] == c, d["labels"] == c
        n_gt += int(gm.sum())
        scores.append(d["scores"][dm])
        tps.append(voc_match(d["boxes"][dm], d["scores"][dm], g["boxes"][gm]))
    return voc_average_precision(np.concatenate(scores), np.concatenate(tps), n_gt)


def voc_attribute_ap(dets: list[dict], gts: list[dict], a: int) -> float:
    scores, tps, n_gt = [], [], 0
    for d, g in zip(dets, gts, strict=True):
        gm = np.array([a in attrs for attrs in g["attributes"]], dtype=bool)
        n_gt += int(gm.sum())
        s = d["scores"] * d["attribute_probs"][:, a]
        scores.append(s)
        tps.append(voc_match(d["boxes"], s, g["boxes"][gm] if len(gm) else g["boxes"][:0]))
    return voc_average_precision(np.concatenate(scores), np.concatenate(tps), n_gt)


# ---------------------------------------------------------------- cases


def _box(x: float, y: float, w: float = 10, h: float = 10) -> list[float]:
    return [x, y, x + w, y + h]


def test_hand_computed_interpolation_difference():
    """2 ground truths; detections TP 0.9, FP 0.8, TP 0.7. VOC: ½·1 + ½·⅔ = 0.8333; COCO: recall points
    0..0.50 (51) at precision 1, 0.51..1 (50) at ⅔ → (51 + 50·⅔)/101 = 0.83498."""
    gt = (np.array([_box(0, 0), _box(50, 50)]), np.array([0, 0]))
    det = (np.array([_box(0, 0), _box(100, 100), _box(51, 50)]), np.array([0.9, 0.8, 0.7]), np.array([0, 0, 0]))
    ap50, ap = coco_ap([det], [gt], 1)
    assert ap50[0] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)
    tp = voc_match(det[0], det[1], gt[0])
    assert voc_average_precision(det[1], tp, 2) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # IoU of the 1-px shifted box: 90/110 = 0.818, a true positive at IoU 0.50 … 0.80 (7 thresholds); at 0.85 …
    # 0.95 only the first detection matches: precision 1 at the 51 recall points 0 … 0.5, 0 beyond
    assert ap[0] == pytest.approx((7 * ap50[0] + 3 * 51 / 101) / 10, abs=1e-12)


def test_iou_thresholds_of_ap_50_95():
    """One detection with IoU 0.72 (> 0.70, < 0.75) to its only ground truth: AP@0.5 = 1, AP@[.5:.95] = 5/10."""
    gt = (np.array([_box(0, 0, 100, 100)]), np.array([0]))
    det = (np.array([_box(0, 0, 100, 72)]), np.array([0.5]), np.array([0]))
    ap50, ap = coco_ap([det], [gt], 2)  # class 1 has no ground truth: NaN, left out of the mean
    assert ap50[0] == pytest.approx(1.0) and ap[0] == pytest.approx(0.5) and np.isnan(ap50[1]) and np.isnan(ap[1])


def _random_case(seed: int, n_images: int = 12, classes: int = 3, attributes: int = 4):
    rng = np.random.default_rng(seed)
    dets, gts = [], []
    for _ in range(n_images):
        m = int(rng.integers(0, 5))
        gb = np.stack([_box(*rng.uniform(0, 80, 2), *rng.uniform(8, 30, 2)) for _ in range(m)]) if m else \
            np.zeros((0, 4))
        gl = rng.integers(0, classes, m)
        attrs = [sorted(set(rng.integers(0, attributes, int(rng.integers(0, 3))).tolist())) for _ in range(m)]
        rows = []
        for b, lab in zip(gb, gl, strict=True):  # found, jittered, sometimes with the wrong class
            if rng.random() < 0.8:
                rows.append((b + rng.normal(0, 2.5, 4), lab if rng.random() < 0.85 else (lab + 1) % classes))
        for _ in range(int(rng.integers(0, 4))):  # false positives
            rows.append((np.array(_box(*rng.uniform(0, 80, 2), *rng.uniform(8, 30, 2))), rng.integers(0, classes)))
        n = len(rows)
        db = np.array([r[0] for r in rows]).reshape(n, 4)
        db[:, 2:] = np.maximum(db[:, 2:], db[:, :2] + 1)
        dets.append({"boxes": db.astype(np.float32), "scores": rng.uniform(0.05, 1, n),
                     "labels": np.array([r[1] for r in rows], np.int64).reshape(n),
                     "attribute_probs": rng.dirichlet(np.ones(attributes), n).reshape(n, attributes)})
        gts.append({"boxes": gb.astype(np.float32), "labels": gl, "attributes": attrs})
    return dets, gts, classes, attributes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pycocotools_agrees_with_our_former_ap(seed):
    dets, gts, classes, attributes = _random_case(seed)
    m = mean_ap(dets, gts, classes, attributes)
    assert set(m) >= {"object_map", "attribute_map", "object_ap", "attribute_ap", "object_map_50_95",
                      "attribute_map_50_95"}
    voc_obj = [voc_class_ap(dets, gts, c) for c in range(classes)]
    voc_attr = [voc_attribute_ap(dets, gts, a) for a in range(attributes)]
    for coco, voc in ((m["object_ap"], voc_obj), (m["attribute_ap"], voc_attr)):
        for x, y in zip(coco, voc, strict=True):
            assert (x is None) == np.isnan(y)
            if x is not None:
                assert abs(x - y) <= TOL + 5e-5, (coco, voc)  # (+ rounding of the stored 4 decimals)
    assert abs(m["object_map"] - np.nanmean(voc_obj)) <= TOL
    assert abs(m["attribute_map"] - np.nanmean(voc_attr)) <= TOL
    assert 0 <= m["object_map_50_95"] <= m["object_map"] <= 1
    assert 0 <= m["attribute_map_50_95"] <= m["attribute_map"] <= 1


def test_no_detections_and_perfect_detections():
    dets, gts, classes, attributes = _random_case(3)
    none = [{**d, "boxes": d["boxes"][:0], "scores": d["scores"][:0], "labels": d["labels"][:0],
             "attribute_probs": d["attribute_probs"][:0]} for d in dets]
    m = mean_ap(none, gts, classes, attributes)
    assert m["object_map"] == 0 and m["attribute_map"] == 0 and m["object_map_50_95"] == 0
    perfect = [{"boxes": g["boxes"], "scores": np.linspace(1, 0.5, len(g["labels"])), "labels": g["labels"],
                "attribute_probs": np.ones((len(g["labels"]), attributes)) / attributes} for g in gts]
    m = mean_ap(perfect, gts, classes, attributes)
    assert m["object_map"] == pytest.approx(1) and m["object_map_50_95"] == pytest.approx(1)
