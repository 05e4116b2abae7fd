"""Detector evaluation: object and attribute mAP by pycocotools (COCO-style AP@0.5 and AP@[.5:.95]) and
region-tag accuracy.

Object AP per class: pycocotools' ``COCOeval`` (``iouType="bbox"``) on the detections of that class; a
detection is a true positive when its IoU with a not-yet-matched ground-truth box of the class is ≥ the
threshold (greedy by score, best IoU); precision is interpolated at COCO's 101 recall points. Attribute AP
per attribute: every detection is scored by ``object score × P(attribute)``, ground truth = the objects that
carry the attribute, same matching (each attribute is a COCO "category"). One area range (all) and at most
100 detections per image and class (``detect_boxes`` keeps at most 100 per image, so nothing is cut).
mAP = mean over classes (attributes) with at least one ground-truth box. ``*_map`` is AP@0.5 (the key
predates pycocotools: it was VOC's all-point AP, which differs from the 101-point value by at most 0.01 per
class, see tests/test_detector_map.py), ``*_map_50_95`` the COCO mean over IoU 0.50:0.05:0.95.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from itmatch.features.detector.inference import detect, detect_boxes

MAX_DETS = 100  # COCO's standard per image (and class); = detect_boxes' topk


def _coco(images: int, classes: int, anns: list[dict]) -> COCO:
    c = COCO()
    c.dataset = {"images": [{"id": i} for i in range(images)],
                 "categories": [{"id": k + 1} for k in range(classes)], "annotations": anns}
    c.createIndex()
    return c


def _anns(boxes: np.ndarray, labels: np.ndarray, image: int, first_id: int,
          scores: np.ndarray | None = None) -> list[dict]:
    """COCO annotations ([x, y, w, h], 1-based category ids) of one image's boxes [n, 4] (x1, y1, x2, y2)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    wh = b[:, 2:] - b[:, :2]
    out = []
    for j in range(len(b)):
        a = {"id": first_id + j, "image_id": image, "category_id": int(labels[j]) + 1, "iscrowd": 0,
             "bbox": [float(b[j, 0]), float(b[j, 1]), float(wh[j, 0]), float(wh[j, 1])],
             "area": float(wh[j, 0] * wh[j, 1])}
        if scores is not None:
            a["score"] = float(scores[j])
        out.append(a)
    return out


def coco_ap(dets: list[tuple[np.ndarray, np.ndarray, np.ndarray]], gts: list[tuple[np.ndarray, np.ndarray]],
            num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AP@0.5 and AP@[.5:.95] by pycocotools (NaN for classes without ground truth).

    ``dets``: per image (boxes [n,4] x1y1x2y2, scores [n], labels [n] 0-based); ``gts``: per image (boxes, labels).
    """
    gt_anns, dt_anns = [], []
    for i, ((db, ds, dl), (gb, gl)) in enumerate(zip(dets, gts, strict=True)):
        gt_anns += _anns(gb, gl, i, len(gt_anns) + 1)
        dt_anns += _anns(db, dl, i, len(dt_anns) + 1, ds)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ev = COCOeval(_coco(len(gts), num_classes, gt_anns), _coco(len(gts), num_classes, dt_anns), "bbox")
        ev.params.areaRng, ev.params.areaRngLbl, ev.params.maxDets = [[0, 1e10]], ["all"], [MAX_DETS]
        ev.evaluate()
        ev.accumulate()
    p = ev.eval["precision"][:, :, :, 0, 0]  # [IoU thresholds, 101 recall points, classes]; -1: no ground truth
    assert np.isclose(ev.params.iouThrs[0], 0.5)
    return _class_means(p[:1]), _class_means(p)


def _class_means(p: np.ndarray) -> np.ndarray:
    """Mean over all but the last axis; NaN where pycocotools marks the class absent (-1)."""
    flat = p.reshape(-1, p.shape[-1])
    present = (flat >= 0).all(0)
    out = np.full(flat.shape[1], np.nan)
    out[present] = flat[:, present].mean(0)
    return out


def _summary(prefix: str, ap50: np.ndarray, ap: np.ndarray) -> dict:
    def mean(x: np.ndarray) -> float:
        return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")

    return {f"{prefix}_map": mean(ap50), f"{prefix}_map_50_95": mean(ap),
            f"{prefix}_ap": [None if np.isnan(x) else round(float(x), 4) for x in ap50],
            f"{prefix}_ap_50_95": [None if np.isnan(x) else round(float(x), 4) for x in ap]}


def mean_ap(dets: list[dict], gts: list[dict], num_classes: int, num_attributes: int) -> dict:
    """dets: per image boxes/scores/labels/attribute_probs; gts: per image boxes [m,4], labels [m],
    attributes (list of index lists). → ``object_map``, ``attribute_map`` (AP@0.5), ``object_map_50_95``,
    ``attribute_map_50_95`` and the per-class lists ``object_ap``, ``attribute_ap`` (+ ``_50_95``)."""
    obj = coco_ap([(d["boxes"], d["scores"], d["labels"]) for d in dets],
                  [(g["boxes"], g["labels"]) for g in gts], num_classes)
    attr_dets, attr_gts = [], []
    for d, g in zip(dets, gts, strict=True):
        n = len(d["scores"])
        # every detection once per attribute, scored object score × P(attribute)
        attr_dets.append((np.repeat(d["boxes"].reshape(-1, 4), num_attributes, axis=0),
                          (d["scores"][:, None] * d["attribute_probs"][:, :num_attributes]).reshape(-1) if n
                          else np.zeros(0), np.tile(np.arange(num_attributes), n)))
        pairs = [(j, a) for j, attrs in enumerate(g["attributes"]) for a in attrs]
        attr_gts.append((np.asarray([g["boxes"][j] for j, _ in pairs]).reshape(-1, 4),
                         np.asarray([a for _, a in pairs], np.int64)))
    attr = coco_ap(attr_dets, attr_gts, num_attributes)
    return {**_summary("object", *obj), **_summary("attribute", *attr),
            "ap_method": "pycocotools COCOeval bbox (101-point interpolated precision)"}


def evaluate_detector(model, cfg: dict, load: Callable[[int], tuple[list, list, list]], n_batches: int,
                      gts: list[dict], num_classes: int, num_attributes: int, score_thresh: float) -> dict:
    """mAP (:func:`mean_ap`) over batches ``load(b) -> (images, scales, orig_hw)`` whose ground truth is ``gts``
    (same order)."""
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
