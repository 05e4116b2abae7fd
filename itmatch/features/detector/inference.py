"""Pre-processing and batched bottom-up-attention inference.

Region selection follows bottom-up attention's feature extraction: class probabilities of every RPN
proposal; for each foreground class, NMS (``nms``, 0.3) over the proposals; a proposal's confidence is its
highest class probability among the classes in which it survived; proposals with confidence ≥ ``conf_thresh``
(0.2) are kept, topped up to ``min_regions`` with the best remaining ones and cut at ``max_regions``
(fixed mode: exactly ``regions``). Object tag = argmax over foreground classes; the attribute head gets the
embedding of that class; attribute tag = argmax over attributes without the "no attribute" class.

``box_source: proposals`` returns the proposal boxes and their features, as bottom-up attention does;
``regressed`` applies the predicted class's box regression and pools the features again on those boxes
(more accurate boxes for a small detector trained briefly).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from itmatch.features.detector.model import BottomUpDetector
from itmatch.features.detector.ops import batched_nms, clip_boxes, decode_boxes, per_class_nms_max_scores
from itmatch.utils.device import autocast, resolve_precision


def resize_scale(h: int, w: int, min_size: int, max_size: int) -> float:
    """Scale that brings the shorter side to ``min_size`` unless the longer would exceed ``max_size``."""
    scale = min_size / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return scale


def preprocess(image: np.ndarray, cfg: dict) -> tuple[torch.Tensor, float]:
    """uint8 ``[H, W, 3]`` RGB → normalised ``[3, h, w]`` float32 in the model's channel order, and the scale."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"preprocess expects a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    inf, inp = cfg["inference"], cfg["input"]
    h, w = image.shape[:2]
    scale = resize_scale(h, w, inf["min_size"], inf["max_size"])
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
    if inp["format"] == "BGR":
        x = x.flip(0)
    mean = torch.tensor(inp["pixel_mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(inp["pixel_std"], dtype=torch.float32)[:, None, None]
    return (x - mean) / std, scale


def batch_images(images: list[torch.Tensor], device: torch.device | str) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Zero-pad (= pixel mean) to a common size → ``[B, 3, H, W]`` and each image's own ``(h, w)``."""
    hw = [(int(im.shape[1]), int(im.shape[2])) for im in images]
    H, W = max(h for h, _ in hw), max(w for _, w in hw)
    batch = torch.zeros(len(images), 3, H, W, dtype=torch.float32)
    for i, im in enumerate(images):
        batch[i, :, :im.shape[1], :im.shape[2]] = im
    return batch.to(device, non_blocking=True), hw


def _autocast(device: torch.device, precision: str):
    """``detector.inference.precision`` (auto: fp32 on CPU, bf16 on GPUs with bf16) as an autocast context."""
    return autocast(device, resolve_precision(precision, device, "detector.inference.precision"))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def region_head(model: BottomUpDetector, feats: torch.Tensor, boxes: list[torch.Tensor]):
    """Pooled features ``[R, D]``, class probabilities ``[R, C+1]``, box deltas ``[R, (C+1)·4]``."""
    pooled = model.roi_heads.pooled_features(feats, boxes, model.stride)
    logits, deltas = model.roi_heads.box_predictor(pooled)
    return pooled.float(), F.softmax(logits.float(), dim=1), deltas.float()


def attributes(model: BottomUpDetector, pooled: torch.Tensor, object_class: torch.Tensor) -> torch.Tensor:
    """Attribute probabilities ``[R, A+1]`` given each region's object class (index with background)."""
    logits = model.roi_heads.attribute_head(pooled, object_class)
    return F.softmax(logits.float(), dim=1)


def _select(max_conf: torch.Tensor, inf: dict) -> torch.Tensor:
    order = torch.sort(max_conf, descending=True, stable=True).indices
    if inf["num_regions"] == "fixed":
        return order[:inf["regions"]]
    n_pass = int((max_conf >= inf["conf_thresh"]).sum())
    n = min(max(n_pass, inf["min_regions"]), inf["max_regions"])
    return order[:n]


@torch.inference_mode()
def detect(model: BottomUpDetector, images: list[torch.Tensor], scales: list[float], orig_hw: list[tuple[int, int]],
           cfg: dict) -> list[dict]:
    """Batched region extraction; see the module docstring. Per image a dict of numpy arrays:
    features [n, D] float32, boxes [n, 4] float32 (original pixels), object_id/attribute_id [n] int64 (0-based,
    no background), object_conf/attribute_conf [n] float32. n is the configured count (fixed) or 10–100
    (adaptive); it is smaller only when the RPN yields fewer proposals than that."""
    inf = cfg["inference"]
    device = _device(model)
    batch, hw = batch_images(images, device)
    with _autocast(device, inf.get("precision", "fp32")):
        feats = model.features(batch)
        proposals, *_ = model.rpn(feats, hw, model.stride, inf["pre_nms"], inf["post_nms"])
        pooled, probs, deltas = region_head(model, feats, proposals)
    out = []
    start = 0
    for i, boxes in enumerate(proposals):
        n = len(boxes)
        p_i, f_i, d_i = probs[start:start + n], pooled[start:start + n], deltas[start:start + n]
        start += n
        max_conf = per_class_nms_max_scores(boxes, p_i[:, 1:], inf["nms"])
        keep = _select(max_conf, inf)
        obj_conf, obj = p_i[keep, 1:].max(dim=1)
        sel_boxes = boxes[keep]
        feat = f_i[keep]
        if inf.get("box_source", "proposals") == "regressed" and len(keep):
            d = d_i[keep].reshape(len(keep), -1, 4)[torch.arange(len(keep), device=device), obj + 1]
            sel_boxes = clip_boxes(decode_boxes(d, sel_boxes, model.box_weights), *hw[i])
            with _autocast(device, inf.get("precision", "fp32")):
                feat = model.roi_heads.pooled_features(feats[i:i + 1], [sel_boxes], model.stride).float()
        with _autocast(device, inf.get("precision", "fp32")):
            a_prob = attributes(model, feat, obj + 1) if len(keep) else torch.zeros(0, 2, device=device)
        attr_conf, attr = a_prob[:, 1:].max(dim=1)
        oh, ow = orig_hw[i]
        box_orig = clip_boxes(sel_boxes / scales[i], oh, ow)
        out.append({
            "features": feat.float().cpu().numpy().astype(np.float32),
            "boxes": box_orig.float().cpu().numpy().astype(np.float32),
            "object_id": obj.cpu().numpy().astype(np.int64),
            "object_conf": obj_conf.float().cpu().numpy().astype(np.float32),
            "attribute_id": attr.cpu().numpy().astype(np.int64),
            "attribute_conf": attr_conf.float().cpu().numpy().astype(np.float32),
        })
    return out


@torch.inference_mode()
def detect_boxes(model: BottomUpDetector, images: list[torch.Tensor], scales: list[float],
                 orig_hw: list[tuple[int, int]], score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 topk: int = 100, pre_nms: int = 1000, post_nms: int = 300) -> list[dict]:
    """Standard Faster R-CNN detections (for mAP): class-specific regressed boxes, score threshold, per-class
    NMS, top-k. Per image: boxes [n,4] (original pixels), scores [n], labels [n] (0-based), attribute_probs
    [n, A] (without "no attribute"), computed on the regressed boxes with the detected class."""
    device = _device(model)
    batch, hw = batch_images(images, device)
    feats = model.features(batch)
    proposals, *_ = model.rpn(feats, hw, model.stride, pre_nms, post_nms)
    pooled, probs, deltas = region_head(model, feats, proposals)
    out, start = [], 0
    for i, props in enumerate(proposals):
        n = len(props)
        p_i, d_i = probs[start:start + n, 1:], deltas[start:start + n]
        start += n
        c = p_i.shape[1]
        boxes = decode_boxes(d_i, props, model.box_weights).reshape(n, c + 1, 4)[:, 1:]
        boxes = clip_boxes(boxes, *hw[i])
        mask = p_i > score_thresh
        idx = torch.nonzero(mask)
        b, s, lab = boxes[idx[:, 0], idx[:, 1]], p_i[idx[:, 0], idx[:, 1]], idx[:, 1]
        keep = batched_nms(b, s, lab, nms_thresh)[:topk]
        b, s, lab = b[keep], s[keep], lab[keep]
        if len(b):
            f = model.roi_heads.pooled_features(feats[i:i + 1], [b], model.stride)
            a = attributes(model, f, lab + 1)[:, 1:]
        else:
            a = torch.zeros(0, model.roi_heads.attribute_head.score.out_features - 1, device=device)
        oh, ow = orig_hw[i]
        out.append({"boxes": clip_boxes(b / scales[i], oh, ow).cpu().numpy(), "scores": s.cpu().numpy(),
                    "labels": lab.cpu().numpy(), "attribute_probs": a.cpu().numpy()})
    return out
