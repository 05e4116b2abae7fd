"""Training the demo detector on ``shapes`` boxes, categories and attributes (RPN + box + class + attribute
losses), resumable per epoch, then evaluated on val (object / attribute mAP@0.5 and @[.5:.95] by pycocotools;
region-tag accuracy).

Losses (summed): RPN objectness (2-way softmax ≡ logistic on fg − bg) + RPN smooth-L1 box deltas over 128
sampled anchors per image; region classification (cross-entropy, background = 0) + class-specific smooth-L1
box deltas over ``roi_batch_per_image`` sampled proposals (ground-truth boxes appended, IoU ≥ 0.5 = object);
attribute cross-entropy on object regions, given the ground-truth class's embedding. Objects carry several
attributes (shapes: colour, then size); as in bottom-up attention the target spreads over them, here with
weight ∝ ``attribute_rank_decay``^k for the k-th listed attribute (1 = uniform, bottom-up attention's choice),
so that the arg-max attribute is the first listed one (the colour).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from itmatch.config import schema_defaults
from itmatch.features.detector.boxes import box_iou, encode_boxes
from itmatch.features.detector.checkpoint import save_own
from itmatch.features.detector.evaluate import evaluate_detector, tag_accuracy
from itmatch.features.detector.inference import batch_images, preprocess
from itmatch.features.detector.model import BottomUpDetector, build_model
from itmatch.features.detector.rpn import rpn_loss
from itmatch.utils.device import resolve_device
from itmatch.utils.io import write_json
from itmatch.utils.logs import log, progress
from itmatch.utils.resume import TensorState, fingerprint


@dataclass
class BoxData:
    """Images (uint8 RGB) with per-image ground truth: boxes [m,4] float32, labels [m] (0-based), attributes."""

    images: list[np.ndarray]
    gts: list[dict]
    image_ids: list[int]
    categories: list[str]
    attributes: list[str]


def load_box_data(json_path: str | Path, image_dir: str | Path, images_parquet: str | Path, split: str,
                  max_images: int | None = None) -> BoxData:
    """Rows of ``split`` in images.parquet, with boxes/categories/attributes from the dataset JSON."""
    with open(json_path, encoding="utf-8") as fh:
        payload = json.load(fh)
    for key in ("categories", "attributes"):
        if key not in payload:
            raise ValueError(f"{json_path}: no top-level {key!r} list (needed to train a detector)")
    cats, attrs = list(payload["categories"]), list(payload["attributes"])
    cat_ix, attr_ix = {c: i for i, c in enumerate(cats)}, {a: i for i, a in enumerate(attrs)}
    by_file = {f"{e.get('filepath', '')}/{e['filename']}".lstrip("/"): e for e in payload["images"]}
    rows = pd.read_parquet(images_parquet)
    rows = rows[rows["split"] == split]
    if max_images:
        rows = rows.iloc[:max_images]
    images, gts = [], []
    for r in rows.itertuples():
        e = by_file.get(r.file)
        if e is None:
            raise ValueError(f"{images_parquet}: image {r.file} (id {r.image_id}) is not in {json_path}")
        boxes, labels, alist = [], [], []
        for j, o in enumerate(e.get("objects", [])):
            if o.get("category") not in cat_ix:
                raise ValueError(f"{json_path}: {r.file} objects[{j}]: unknown category {o.get('category')!r}")
            bad = [a for a in o.get("attributes", []) if a not in attr_ix]
            if bad:
                raise ValueError(f"{json_path}: {r.file} objects[{j}]: unknown attributes {bad}")
            boxes.append([float(v) for v in o["box"]])
            labels.append(cat_ix[o["category"]])
            alist.append([attr_ix[a] for a in o.get("attributes", [])])
        with Image.open(Path(image_dir) / r.file) as im:
            images.append(np.asarray(im.convert("RGB")))
        gts.append({"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                    "labels": np.asarray(labels, dtype=np.int64), "attributes": alist})
    return BoxData(images, gts, [int(i) for i in rows["image_id"]], cats, attrs)


def batch_loader(data: BoxData, cfg: dict, batch_size: int):
    """``load(b) -> (images, scales, orig_hw)`` over ``data`` in order, and the number of batches."""
    def load(b: int):
        ims = data.images[b * batch_size:(b + 1) * batch_size]
        pre = [preprocess(im, cfg) for im in ims]
        return [p[0] for p in pre], [p[1] for p in pre], [im.shape[:2] for im in ims]
    return load, math.ceil(len(data.images) / batch_size)


def roi_targets(proposals: list[torch.Tensor], gts: list[dict], batch_per_image: int, fg_fraction: float,
                box_weights: tuple[float, ...], convention: str = "continuous"):
    """Sampled region boxes per image, class labels (0 = background), box targets, gt index of each sample."""
    boxes_out, labels_out, targets_out, gt_index = [], [], [], []
    for props, g in zip(proposals, gts, strict=True):
        gt_boxes, gt_labels = g["boxes_t"], g["labels_t"]
        dev = props.device
        cand = torch.cat([props, gt_boxes])
        if len(gt_boxes):
            best, which = box_iou(cand, gt_boxes).max(dim=1)
        else:
            best, which = torch.zeros(len(cand), device=dev), torch.zeros(len(cand), dtype=torch.long, device=dev)
        fg = torch.nonzero(best >= 0.5).squeeze(1)
        bg = torch.nonzero(best < 0.5).squeeze(1)
        n_fg = min(len(fg), int(batch_per_image * fg_fraction))
        fg = fg[torch.randperm(len(fg)).to(dev)[:n_fg]]  # (permutations from the CPU generator on any device)
        bg = bg[torch.randperm(len(bg)).to(dev)[:batch_per_image - n_fg]]
        sel = torch.cat([fg, bg])
        labels = torch.zeros(len(sel), dtype=torch.long, device=dev)
        labels[:n_fg] = gt_labels[which[fg]] + 1
        tgt = torch.zeros(len(sel), 4, device=dev)
        if n_fg:
            tgt[:n_fg] = encode_boxes(cand[fg], gt_boxes[which[fg]], box_weights, convention)
        boxes_out.append(cand[sel])
        labels_out.append(labels)
        targets_out.append(tgt)
        gt_index.append(torch.cat([which[fg], torch.full((len(bg),), -1, dtype=torch.long, device=dev)]))
    return boxes_out, torch.cat(labels_out), torch.cat(targets_out), gt_index


def attribute_targets(gts: list[dict], gt_index: list[torch.Tensor], num_attr_logits: int, decay: float):
    """Soft targets ``[F, A+1]`` for the object regions (in sample order), weight ∝ decay^rank."""
    rows = []
    for g, idx in zip(gts, gt_index, strict=True):
        for j in idx[idx >= 0].tolist():
            t = torch.zeros(num_attr_logits)
            attrs = g["attributes"][j]
            if attrs:
                for rank, a in enumerate(attrs):
                    t[a + 1] += decay ** rank
                t /= t.sum()
            else:
                t[0] = 1.0  # "no attribute"
            rows.append(t)
    return torch.stack(rows) if rows else torch.zeros(0, num_attr_logits)


def training_step(model: BottomUpDetector, batch: torch.Tensor, hw: list[tuple[int, int]], gts: list[dict],
                  tcfg: dict) -> dict[str, torch.Tensor]:
    feats = model.features(batch)
    # scale 1: only rpn_min_size × scale uses it, and the demo trains with rpn_min_size 0
    rpn = model.rpn(feats, hw, [1.0] * len(hw), model.stride, tcfg["rpn_pre_nms"], tcfg["rpn_post_nms"])
    gt_boxes = [g["boxes_t"] for g in gts]
    rpn_cls, rpn_box = rpn_loss(rpn["logits"], rpn["deltas"], rpn["anchors"], gt_boxes, model.rpn.weights,
                                tcfg["rpn_batch_per_image"], convention=model.convention)
    boxes, labels, targets, gt_index = roi_targets(rpn["proposals"], gts, tcfg["roi_batch_per_image"],
                                                   tcfg["roi_positive_fraction"], model.box_weights,
                                                   model.convention)
    pooled = model.roi_heads.pooled_features(feats, boxes, model.stride)
    cls_logits, box_deltas = model.roi_heads.box_predictor(pooled)
    cls_loss = F.cross_entropy(cls_logits, labels)
    fg = torch.nonzero(labels > 0).squeeze(1)
    pred = box_deltas.reshape(len(labels), -1, 4)[fg, labels[fg]]
    box_loss = F.smooth_l1_loss(pred, targets[fg], beta=1.0, reduction="sum") / max(1, len(labels))
    attr_t = attribute_targets(gts, gt_index, model.roi_heads.attribute_head.score.out_features,
                               tcfg["attribute_rank_decay"]).to(pooled.device)
    if len(fg):
        attr_logits = model.roi_heads.attribute_head(pooled[fg], labels[fg])
        attr_loss = -(attr_t * F.log_softmax(attr_logits, dim=1)).sum(dim=1).mean()
    else:
        attr_loss = pooled.sum() * 0
    return {"rpn_cls": rpn_cls, "rpn_box": rpn_box, "cls": cls_loss, "box": box_loss,
            "attr": attr_loss * tcfg["attribute_loss_weight"]}


def _fingerprint(cfg: dict, n_train: int) -> str:
    """What a saved training state must match to be resumed: architecture, training and input settings, and
    the number of training images."""
    return fingerprint({"arch": cfg["architecture"], "training": cfg["training"], "input": cfg["input"],
                        "n": n_train})


def _lr_at(it: int, total: int, base: float, warmup: int) -> float:
    if it < warmup:
        return base * (0.1 + 0.9 * it / max(1, warmup))
    return base * 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, total - warmup)))


def _gt_tensors(g: dict, flip_w: int | None, scale: float) -> dict:
    boxes = torch.as_tensor(g["boxes"], dtype=torch.float32) * scale
    if flip_w is not None and len(boxes):
        boxes = torch.stack([flip_w - boxes[:, 2], boxes[:, 1], flip_w - boxes[:, 0], boxes[:, 3]], dim=1)
    return {**g, "boxes_t": boxes, "labels_t": torch.as_tensor(g["labels"], dtype=torch.long)}


def train_detector(json_path: str, image_dir: str, images_parquet: str, model_out: str, metrics_out: str,
                   cfg: dict, threads: int = 2) -> dict:
    """Train, evaluate on val, write ``model_out`` and ``metrics_out``; resumes from ``train_state.pt``."""
    tcfg = {**schema_defaults("detector.training"), **cfg["training"]}  # the schema: the one home of defaults
    # The demo model is small: per-op overhead dominates, and on a shared CPU OpenMP threads spin-wait for
    # each other (measured: 1 thread 0.23 s CPU per batch of 16, 2 threads 3.4 s), hence torch_threads: 1.
    threads = min(max(1, threads), tcfg["torch_threads"])
    torch.set_num_threads(threads)
    t0, c0 = time.time(), time.process_time()
    seed = tcfg["seed"]
    torch.manual_seed(seed)
    random.seed(seed)
    max_images = tcfg["max_images"]
    train = load_box_data(json_path, image_dir, images_parquet, "train", max_images)
    val = load_box_data(json_path, image_dir, images_parquet, "val", max_images)
    if not train.images:
        raise ValueError(f"{images_parquet}: no train images")
    log.info("detector: %d train / %d val images, %d categories, %d attributes (loaded in %.1fs)",
             len(train.images), len(val.images), len(train.categories), len(train.attributes), time.time() - t0)
    arch = {**cfg["architecture"], "num_object_classes": len(train.categories) + 1,
            "num_attribute_classes": len(train.attributes) + 1}
    device = resolve_device(str(tcfg["device"]), "detector.training.device")
    model = build_model(arch).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    bs = tcfg["batch_size"]
    steps = math.ceil(len(train.images) / bs)
    total = steps * tcfg["epochs"]
    state = TensorState(Path(model_out).with_name("train_state.pt"), _fingerprint(cfg, len(train.images)),
                        "detector training")
    start_epoch, history, train_seconds, train_cpu = 0, [], 0.0, 0.0
    st = state.load()
    if st is not None:
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        start_epoch, history, train_seconds = st["epoch"], st["history"], st["seconds"]
        train_cpu = st["cpu_seconds"]
        torch.set_rng_state(st["torch_rng"])
        random.setstate(st["py_rng"])
        log.info("detector: resuming after epoch %d from %s", start_epoch, state.path)
    for epoch in range(start_epoch, tcfg["epochs"]):
        te, ce = time.time(), time.process_time()
        model.train()
        order = list(range(len(train.images)))
        random.shuffle(order)
        sums: dict[str, float] = {}
        for s in progress(range(steps), f"detector epoch {epoch + 1}/{tcfg['epochs']}", steps, "batch"):
            it = epoch * steps + s
            for group in opt.param_groups:
                group["lr"] = _lr_at(it, total, tcfg["lr"], tcfg["warmup_iters"])
            idx = order[s * bs:(s + 1) * bs]
            ims, gts = [], []
            for i in idx:
                x, scale = preprocess(train.images[i], cfg)
                flip = tcfg["hflip"] and random.random() < 0.5
                if flip:
                    x = x.flip(2)
                ims.append(x)
                g = _gt_tensors(train.gts[i], x.shape[2] if flip else None, scale)
                gts.append({**g, "boxes_t": g["boxes_t"].to(device), "labels_t": g["labels_t"].to(device)})
            batch, hw = batch_images(ims, device)
            losses = training_step(model, batch, hw, gts, tcfg)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"detector training: non-finite loss at epoch {epoch + 1} step {s}: "
                                         f"{ {k: float(v) for k, v in losses.items()} }")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["total"] = sums.get("total", 0.0) + float(loss.detach())
            if (s + 1) % 50 == 0:
                log.info("detector epoch %d step %d/%d: mean loss so far %.4f", epoch + 1, s + 1, steps,
                         sums["total"] / (s + 1))
        mean = {k: round(v / steps, 4) for k, v in sums.items()}
        train_seconds += time.time() - te
        train_cpu += time.process_time() - ce
        history.append({"epoch": epoch + 1, **mean, "seconds": round(time.time() - te, 1),
                        "cpu_seconds": round(time.process_time() - ce, 1)})
        log.info("detector epoch %d/%d: loss %.4f (%s) in %.0fs wall, %.0fs CPU", epoch + 1, tcfg["epochs"],
                 mean["total"], ", ".join(f"{k} {v:.3f}" for k, v in mean.items() if k != "total"),
                 time.time() - te, time.process_time() - ce)
        state.save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "history": history, "seconds": train_seconds, "cpu_seconds": train_cpu,
                    "torch_rng": torch.get_rng_state(), "py_rng": random.getstate()})
    metrics = evaluate(model, cfg, val, tcfg["eval_score_thresh"])
    metrics.update({"train_images": len(train.images), "epochs": tcfg["epochs"], "history": history,
                    "train_seconds": round(train_seconds, 1), "train_cpu_seconds": round(train_cpu, 1),
                    "threads": threads, "total_seconds": round(time.time() - t0, 1),
                    "total_cpu_seconds": round(time.process_time() - c0, 1), "load_average": os.getloadavg(),
                    "object_names": train.categories, "attribute_names": train.attributes})
    log.info("detector val (pycocotools): object mAP@0.5 %.3f (@[.5:.95] %.3f), attribute mAP@0.5 %.3f, top-region "
             "tags right (shape %.3f, shape+colour %.3f) on %d images; training %.0fs wall / %.0fs CPU (load "
             "average %s)", metrics["object_map"], metrics["object_map_50_95"], metrics["attribute_map"],
             metrics["tags"]["object"],
             metrics["tags"]["object_colour"], len(val.images), train_seconds, train_cpu,
             " ".join(f"{x:.1f}" for x in os.getloadavg()))
    save_own(model_out, model, cfg["input"], train.categories, train.attributes,
             {"metrics": {k: float(metrics[k]) for k in ("object_map", "attribute_map")}})
    write_json(metrics_out, {"dataset_split": "val", **metrics})
    state.discard()
    return metrics


def evaluate(model: BottomUpDetector, cfg: dict, data: BoxData, score_thresh: float) -> dict:
    """Object / attribute mAP (pycocotools: @0.5 and @[.5:.95]) and region-tag accuracy of ``model`` on ``data``
    (detections above ``score_thresh``: ``detector.training.eval_score_thresh``)."""
    load, n = batch_loader(data, cfg, cfg["inference"]["batch_size"])
    metrics = evaluate_detector(model, cfg, load, n, data.gts, len(data.categories), len(data.attributes),
                                score_thresh)
    metrics["tags"] = tag_accuracy(model, cfg, load, n, data.gts)
    return metrics
