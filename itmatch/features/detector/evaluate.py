"""Detector evaluation: object and attribute mAP@0.5 (VOC all-point AP) and region-tag accuracy.

Object AP per class: detections of that class ranked by score, a detection is a true positive when its
IoU with a not-yet-matched ground-truth box of the class is ≥ 0.5 (greedy, best IoU). Attribute AP per
attribute: every detection is scored by ``object score × P(attribute)``, ground truth = the objects that
carry the attribute, same matching. mAP = mean over classes (attributes) with at least one ground truth.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torchvision.ops import box_iou

from itmatch.features.detector.inference import detect, detect_boxes


def average_precision(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> float:
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


def _match(det_boxes: np.ndarray, det_scores: np.ndarray, gt_boxes: np.ndarray, thr: float = 0.5) -> np.ndarray:
    """True-positive flags of one image's detections (one class), greedy by score."""
    tp = np.zeros(len(det_boxes), dtype=bool)
    if len(gt_boxes) == 0 or len(det_boxes) == 0:
        return tp
    iou = box_iou(torch.as_tensor(det_boxes, dtype=torch.float32), torch.as_tensor(gt_boxes, dtype=torch.float32))
    iou = iou.numpy()
    used = np.zeros(len(gt_boxes), dtype=bool)
    for d in np.argsort(-det_scores, kind="stable"):
        cand = np.where(used, -1.0, iou[d])
        g = int(np.argmax(cand))
        if cand[g] >= thr:
            used[g] = True
            tp[d] = True
    return tp


def mean_ap(dets: list[dict], gts: list[dict], num_classes: int, num_attributes: int) -> dict:
    """dets: per image boxes/scores/labels/attribute_probs; gts: per image boxes [m,4], labels [m],
    attributes (list of index lists). → {"object_map", "attribute_map", "object_ap", "attribute_ap"}."""
    obj_ap, attr_ap = [], []
    for c in range(num_classes):
        scores, tps, n_gt = [], [], 0
        for d, g in zip(dets, gts, strict=True):
            gm = g["labels"] == c
            dm = d["labels"] == c
            n_gt += int(gm.sum())
            scores.append(d["scores"][dm])
            tps.append(_match(d["boxes"][dm], d["scores"][dm], g["boxes"][gm]))
        obj_ap.append(average_precision(np.concatenate(scores), np.concatenate(tps), n_gt))
    for a in range(num_attributes):
        scores, tps, n_gt = [], [], 0
        for d, g in zip(dets, gts, strict=True):
            gm = np.array([a in attrs for attrs in g["attributes"]], dtype=bool)
            n_gt += int(gm.sum())
            s = d["scores"] * d["attribute_probs"][:, a] if len(d["scores"]) else d["scores"]
            scores.append(s)
            tps.append(_match(d["boxes"], s, g["boxes"][gm] if len(gm) else g["boxes"][:0]))
        attr_ap.append(average_precision(np.concatenate(scores), np.concatenate(tps), n_gt))
    return {"object_map": float(np.nanmean(obj_ap)), "attribute_map": float(np.nanmean(attr_ap)),
            "object_ap": [None if np.isnan(x) else round(x, 4) for x in obj_ap],
            "attribute_ap": [None if np.isnan(x) else round(x, 4) for x in attr_ap]}


def evaluate_detector(model, cfg: dict, load: Callable[[int], tuple[list, list, list]], n_batches: int,
                      gts: list[dict], num_classes: int, num_attributes: int, score_thresh: float) -> dict:
    """mAP over batches ``load(b) -> (images, scales, orig_hw)`` whose ground truth is ``gts`` (same order)."""
    inf = cfg["inference"]
    model.eval()
    dets = []
    for b in range(n_batches):
        images, scales, hw = load(b)
        dets += detect_boxes(model, images, scales, hw, score_thresh=score_thresh, pre_nms=inf["pre_nms"],
                             post_nms=inf["post_nms"])
    return mean_ap(dets, gts, num_classes, num_attributes)


def tag_accuracy(model, cfg: dict, load: Callable[[int], tuple[list, list, list]], n_batches: int,
                 gts: list[dict]) -> dict:
    """How often the extracted regions' tags are true of the image.

    For each image with m objects, the top m regions (by bottom-up confidence) are checked: ``object`` = the
    region's shape names a category present in the image; ``object_colour`` = some object in the image has
    that shape and the region's attribute tag as its primary attribute (the first one its annotation lists: the
    colour on ``shapes``). ``top1_*``:
    the same for the single top region of each image.
    """
    model.eval()
    hits = {"object": 0, "object_colour": 0, "top1_object": 0, "top1_object_colour": 0}
    n_regions = n_images = 0
    k = 0
    for b in range(n_batches):
        images, scales, hw = load(b)
        for r in detect(model, images, scales, hw, cfg):
            g = gts[k]
            k += 1
            pairs = {(int(lab), int(a)) for lab, attrs in zip(g["labels"], g["attributes"], strict=True)
                     for a in attrs[:1]}
            present = {int(lab) for lab in g["labels"]}
            m = len(g["labels"])
            if m == 0:
                continue
            n_images += 1
            for j in range(min(m, len(r["object_id"]))):
                ok_obj = int(r["object_id"][j]) in present
                ok_pair = (int(r["object_id"][j]), int(r["attribute_id"][j])) in pairs
                hits["object"] += ok_obj
                hits["object_colour"] += ok_pair
                n_regions += 1
                if j == 0:
                    hits["top1_object"] += ok_obj
                    hits["top1_object_colour"] += ok_pair
    out = {k2: v / max(n_regions, 1) for k2, v in hits.items() if not k2.startswith("top1")}
    out.update({k2: v / max(n_images, 1) for k2, v in hits.items() if k2.startswith("top1")})
    out.update({"n_images": n_images, "n_regions": n_regions})
    return out
