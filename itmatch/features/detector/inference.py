"""Pre-processing and batched bottom-up-attention inference, following the reference extractor.

Reference: MILVLG/bottom-up-attention.pytorch 4dbce86 (``utils/extract_utils.py``: ``get_image_blob``,
``save_roi_features``; ``configs/caffe/test-caffe-r101*.yaml``).

- :func:`preprocess`: the image in BGR as float32, pixel mean subtracted first, then one ``cv2.resize`` with
  ``INTER_LINEAR`` by the scale that brings the short side to ``min_size`` (600) unless the long side would
  round above ``max_size`` (1000).
- :func:`select_regions`: per foreground class, NMS (torchvision, 0.3) over the proposals *in original-image
  pixels* (proposal / scale); a proposal's ``max_conf`` is its highest class probability among the classes in
  which it survived. Proposals with ``max_conf >= conf_thresh`` (0.2) are kept in proposal order; when fewer
  than ``min_regions`` or more than ``max_regions`` pass, the best ``min_regions`` / ``max_regions`` by
  ``torch.argsort(max_conf, descending=True)`` are taken instead (fixed mode: min = max = ``regions``).
- Output per region: the proposal box divided by the scale (original-image pixels, not clipped further), the
  res5 mean-pooled feature, object tag = arg-max over the foreground classes with its probability, attribute
  tag = arg-max over the attributes without "no attribute" with its probability (attribute probabilities of
  the model's forward: the attribute head was given the arg-max over all classes).

``box_source: regressed`` (the demo detector) instead applies the tagged class's box regression, clips, pools
the features again on those boxes and recomputes the attributes for the tagged class.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from itmatch.config import schema_defaults
from itmatch.features.detector.boxes import clip, decode_boxes, nms_boxes, per_class_max_conf
from itmatch.features.detector.model import BottomUpDetector
from itmatch.utils.device import autocast, resolve_precision


def resize_scale(h: int, w: int, min_size: int, max_size: int) -> float:
    """Scale that brings the shorter side to ``min_size`` unless the longer would then round above ``max_size``
    (``get_image_blob``'s rule: ``np.round(scale · long) > max_size`` → ``max_size / long``)."""
    scale = float(min_size) / float(min(h, w))
    if np.round(scale * max(h, w)) > max_size:
        scale = float(max_size) / float(max(h, w))
    return scale


def preprocess(image: np.ndarray, cfg: dict) -> tuple[torch.Tensor, float]:
    """uint8 ``[H, W, 3]`` RGB → ``[3, h, w]`` float32 in the model's channel order, and the scale.

    As ``get_image_blob``: channels reordered (BGR for ``input.format: BGR``), float32 minus the pixel mean
    (computed in float64, as numpy does for ``float32 -= float64``), then ``cv2.resize(…, fx=scale, fy=scale,
    interpolation=INTER_LINEAR)``; divided by ``pixel_std`` only where it is not 1."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"preprocess expects a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    inf, inp = cfg["inference"], cfg["input"]
    h, w = image.shape[:2]
    scale = resize_scale(h, w, inf["min_size"], inf["max_size"])
    im = image[:, :, ::-1] if inp["format"] == "BGR" else image
    im = (im.astype(np.float32) - np.asarray(inp["pixel_mean"], dtype=np.float64)[None, None]).astype(np.float32)
    im = cv2.resize(im, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    std = np.asarray(inp["pixel_std"], dtype=np.float32)
    if (std != 1).any():
        im = im / std[None, None]
    return torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).contiguous(), scale


def batch_images(images: list[torch.Tensor], device: torch.device | str) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Zero-pad (= pixel mean) to a common size → ``[B, 3, H, W]`` and each image's own ``(h, w)``
    (detectron2's ``ImageList.from_tensors`` with no size divisibility, as the reference's C4 backbone)."""
    hw = [(int(im.shape[1]), int(im.shape[2])) for im in images]
    H, W = max(h for h, _ in hw), max(w for _, w in hw)
    batch = torch.zeros(len(images), 3, H, W, dtype=torch.float32)
    for i, im in enumerate(images):
        batch[i, :, :im.shape[1], :im.shape[2]] = im
    return batch.to(device, non_blocking=True), hw


def _autocast(device: torch.device, precision: str):
    """``detector.inference.precision`` (auto: fp32 on CPU, bf16 on GPUs with bf16) as an autocast context."""
    return autocast(device, resolve_precision(precision, device, "detector.inference.precision"))


def inference_settings(inf: dict) -> dict:
    """``detector.inference`` over the schema's defaults of its optional keys (``box_source``, ``precision``)."""
    return {**schema_defaults("detector.inference"), **inf}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def region_counts(inf: dict) -> tuple[int, int]:
    """(min, max) regions: ``regions`` twice in fixed mode, ``min_regions``/``max_regions`` in adaptive mode."""
    if inf["num_regions"] == "fixed":
        return int(inf["regions"]), int(inf["regions"])
    if inf["num_regions"] == "adaptive":
        return int(inf["min_regions"]), int(inf["max_regions"])
    raise ValueError(f"detector.inference.num_regions {inf['num_regions']!r}: expected 'fixed' or 'adaptive'")


def select_rows(max_conf: torch.Tensor, conf_thresh: float, min_boxes: int, max_boxes: int) -> torch.Tensor:
    """The reference's choice of regions (``save_roi_features``), rows in output order."""
    keep = torch.nonzero(max_conf >= conf_thresh).flatten()
    if len(keep) < min_boxes:
        keep = torch.argsort(max_conf, descending=True)[:min_boxes]
    elif len(keep) > max_boxes:
        keep = torch.argsort(max_conf, descending=True)[:max_boxes]
    return keep


def select_regions(out: dict[str, torch.Tensor], scale: float, inf: dict, convention: str) -> dict[str, torch.Tensor]:
    """Chosen regions of one image's :meth:`BottomUpDetector.forward` output: ``rows`` (proposal rows, output
    order), ``boxes`` (proposals / scale), ``max_conf`` [P] (every proposal's selection score), ``object_id``,
    ``object_conf``, ``attribute_id``, ``attribute_conf`` (0-based, without background / "no attribute")."""
    dets = out["proposals"] / scale
    scores = out["cls_prob"]
    max_conf = per_class_max_conf(dets, scores[:, 1:], inf["nms"], convention)
    lo, hi = region_counts(inf)
    rows = select_rows(max_conf, inf["conf_thresh"], lo, hi)
    obj_conf, obj = scores[rows, 1:].max(dim=1)
    attr_conf, attr = out["attr_prob"][rows, 1:].max(dim=1)
    return {"rows": rows, "boxes": dets[rows], "max_conf": max_conf, "object_id": obj, "object_conf": obj_conf,
            "attribute_id": attr, "attribute_conf": attr_conf}


def _numpy(d: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    ints = ("object_id", "attribute_id")
    return {k: v.cpu().numpy().astype(np.int64 if k in ints else np.float32) for k, v in d.items()}


def regions(model: BottomUpDetector, out: dict[str, torch.Tensor], scale: float, hw: tuple[int, int],
            orig_hw: tuple[int, int], inf: dict) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """One image's extracted regions from its :meth:`BottomUpDetector.forward` output (numpy, see :func:`detect`)
    and the selection (:func:`select_regions`)."""
    inf = inference_settings(inf)
    sel = select_regions(out, scale, inf, model.convention)
    rows, feat, boxes = sel["rows"], out["features"][sel["rows"]], sel["boxes"]
    attr_conf, attr = sel["attribute_conf"], sel["attribute_id"]
    if inf["box_source"] == "regressed" and len(rows):
        obj = sel["object_id"]
        d = out["box_deltas"][rows].reshape(len(rows), -1, 4)[torch.arange(len(rows), device=rows.device), obj + 1]
        reg = clip(decode_boxes(d, out["proposals"][rows], model.box_weights, model.convention), *hw,
                   model.convention)
        with _autocast(rows.device, inf["precision"]):
            feat = model.roi_heads.pooled_features(out["feature_map"], [reg], model.stride).float()
            a_prob = F.softmax(model.roi_heads.attribute_head(feat, obj + 1).float(), dim=1)
        attr_conf, attr = a_prob[:, 1:].max(dim=1)
        boxes = clip(reg / scale, *orig_hw, model.convention)
    return _numpy({"features": feat.float(), "boxes": boxes, "object_id": sel["object_id"],
                   "object_conf": sel["object_conf"], "attribute_id": attr, "attribute_conf": attr_conf}), sel


@torch.inference_mode()
def detect(model: BottomUpDetector, images: list[torch.Tensor], scales: list[float], orig_hw: list[tuple[int, int]],
           cfg: dict, stages: list[dict] | None = None) -> list[dict]:
    """Batched region extraction; see the module docstring. Per image a dict of numpy arrays:
    features [n, D] float32, boxes [n, 4] float32 (original pixels), object_id/attribute_id [n] int64 (0-based,
    no background), object_conf/attribute_conf [n] float32. n is the configured count (fixed) or 10–100
    (adaptive); it is smaller only when the RPN yields fewer proposals than that.
    ``stages``: when a list is given, one dict per image of every intermediate tensor is appended to it
    (``blob``, ``scale``, ``res4``, ``proposals``, ``proposal_scores``, ``pooled``, ``features``, ``cls_prob``,
    ``attr_prob``, ``box_deltas``, ``max_conf``, ``rows``, ``boxes``) for the comparison with the reference."""
    inf = inference_settings(cfg["inference"])
    device = _device(model)
    batch, hw = batch_images(images, device)
    with _autocast(device, inf["precision"]):
        outs = model(batch, hw, scales, inf["pre_nms"], inf["post_nms"], stages=stages is not None)
    result = []
    for i, o in enumerate(outs):
        r, sel = regions(model, o, scales[i], hw[i], orig_hw[i], inf)
        result.append(r)
        if stages is not None:
            stages.append({"blob": images[i], "scale": scales[i], **{k: v for k, v in o.items() if k != "feature_map"},
                           "max_conf": sel["max_conf"], "rows": sel["rows"], "boxes": sel["boxes"]})
    return result


@torch.inference_mode()
def detect_boxes(model: BottomUpDetector, images: list[torch.Tensor], scales: list[float],
                 orig_hw: list[tuple[int, int]], score_thresh: float, nms_thresh: float = 0.5,
                 topk: int = 100, pre_nms: int = 1000, post_nms: int = 300) -> list[dict]:
    """Standard Faster R-CNN detections (for mAP): class-specific regressed boxes, score threshold, per-class
    NMS (torchvision ``batched_nms``), top-k. Per image: boxes [n,4] (original pixels), scores [n], labels [n]
    (0-based), attribute_probs [n, A] (without "no attribute"), computed on the regressed boxes with the
    detected class."""
    device = _device(model)
    batch, hw = batch_images(images, device)
    out = []
    for i, o in enumerate(model(batch, hw, scales, pre_nms, post_nms)):
        props, p_i = o["proposals"], o["cls_prob"][:, 1:]
        n, c = p_i.shape
        boxes = decode_boxes(o["box_deltas"], props, model.box_weights, model.convention).reshape(n, c + 1, 4)[:, 1:]
        boxes = clip(boxes.reshape(-1, 4), *hw[i], model.convention).reshape(n, c, 4)
        idx = torch.nonzero(p_i > score_thresh)
        b, s, lab = boxes[idx[:, 0], idx[:, 1]], p_i[idx[:, 0], idx[:, 1]], idx[:, 1]
        keep = batched_nms(nms_boxes(b, model.convention), s, lab, nms_thresh)[:topk]
        b, s, lab = b[keep], s[keep], lab[keep]
        if len(b):
            f = model.roi_heads.pooled_features(o["feature_map"], [b], model.stride)
            a = F.softmax(model.roi_heads.attribute_head(f, lab + 1).float(), dim=1)[:, 1:]
        else:
            a = torch.zeros(0, model.roi_heads.attribute_head.score.out_features - 1, device=device)
        oh, ow = orig_hw[i]
        out.append({"boxes": clip(b / scales[i], oh, ow, model.convention).cpu().numpy(), "scores": s.cpu().numpy(),
                    "labels": lab.cpu().numpy(), "attribute_probs": a.cpu().numpy()})
    return out
