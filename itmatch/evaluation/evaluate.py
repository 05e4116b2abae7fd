"""Encode a split and fill its [I, C] similarity matrix shard by shard; test metrics → metrics.json.

Generic over models: images and captions are encoded in chunks (``model.encode_images`` /
``encode_captions``, whatever structure they return) and ``model.score`` is called for every pair of an
image chunk and a caption chunk, so memory is bounded by the chunk sizes plus the encoded split. A
checkpoint with several parts (SCAN / PFAN t2i + i2t) is scored part by part and the parts' similarity
matrices are averaged (the papers' fusion). A similarity matrix with NaN/inf entries is an error
(:class:`NonFiniteSimilarityError`): no metrics are written for a diverged model. Checkpoints are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import numpy as np
import torch

from itmatch.config import schema_defaults
from itmatch.corpus.data import Corpus, RowDataset, collate_captions, collate_images, loader
from itmatch.evaluation.metrics import protocols
from itmatch.models.base import MatchingModel
from itmatch.models.checkpoint import load_parts
from itmatch.utils.device import autocast, resolve_device, resolve_precision, to_device
from itmatch.utils.io import write_json
from itmatch.utils.logs import log, progress


class NonFiniteSimilarityError(FloatingPointError):
    """A similarity matrix holds NaN or inf (a diverged model or corrupted features)."""


def check_finite_similarity(sim: np.ndarray, what: str) -> None:
    """Raise :class:`NonFiniteSimilarityError` naming ``what``, the count and the first (image, caption) position."""
    bad = ~np.isfinite(sim)
    if bad.any():
        i, c = (int(x) for x in np.argwhere(bad)[0])
        raise NonFiniteSimilarityError(f"{what}: the similarity matrix has {int(bad.sum())} non-finite value(s) of "
                             f"{sim.size} (first at image {i}, caption {c}: {sim[i, c]})")


@torch.no_grad()
def similarity(model: MatchingModel, corpus: Corpus, image_rows: np.ndarray, caption_rows: np.ndarray,
               image_batch: int = 128, caption_batch: int = 512, num_workers: int = 0, desc: str = "score",
               precision: str = "fp32") -> np.ndarray:
    """[len(image_rows), len(caption_rows)] float32 similarities; encoding and scoring under ``precision``
    (a resolved one: fp32 | bf16 | fp16, :func:`itmatch.utils.device.resolve_precision`)."""
    model.eval()
    dev = next(iter(model.parameters())).device
    pin = dev.type == "cuda"
    image_batches = loader(RowDataset(corpus, image_rows, "images"), batch_size=image_batch,
                           num_workers=num_workers, collate=partial(collate_images, float16=pin), pin_memory=pin)
    caption_batches = loader(RowDataset(corpus, caption_rows, "captions"), batch_size=caption_batch,
                             num_workers=num_workers, collate=collate_captions, pin_memory=pin)
    with autocast(dev, precision):
        imgs = [model.encode_images(to_device(b, dev)) for b in image_batches]
        caps = [model.encode_captions(to_device(b, dev)) for b in caption_batches]
    sim = np.zeros((len(image_rows), len(caption_rows)), dtype=np.float32)
    i0 = 0
    for img in progress(imgs, desc=desc, unit="image chunk"):
        c0 = 0
        n_i = 0
        for cap in caps:
            with autocast(dev, precision):
                s = model.score(img, cap)
            s = s.float().cpu().numpy()
            n_i = s.shape[0]
            sim[i0:i0 + n_i, c0:c0 + s.shape[1]] = s
            c0 += s.shape[1]
        i0 += n_i
    return sim


def split_rows(corpus: Corpus, split: str, max_images: int | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                                    np.ndarray]:
    """Image rows, caption rows and each caption's position in the image rows, for one split."""
    image_rows = corpus.rows(split, "images")
    if max_images:
        image_rows = image_rows[:max_images]
    pos = {int(r): k for k, r in enumerate(image_rows)}
    caption_rows = corpus.rows(split, "captions")
    caption_rows = caption_rows[np.isin(corpus.caption_image[caption_rows], image_rows)]
    cap_image = np.array([pos[int(corpus.caption_image[c])] for c in caption_rows], dtype=np.int64)
    if len(image_rows) == 0:
        raise ValueError(f"split {split!r} has no images")
    return image_rows, caption_rows, cap_image


def evaluate_checkpoint(checkpoint: str, corpus: Corpus, split: str = "test", folds: int = 1, full: bool = False,
                        image_batch: int = 128, caption_batch: int = 512, num_workers: int = 0, device: str = "cpu",
                        precision: str = "fp32") -> tuple[dict[str, Any], int, int]:
    """(protocols block, n_images, n_captions) of a checkpoint on a split; fused parts averaged, or summed with
    the parts' ``fusion_weight`` where every part has one (GLFN eq. 33: α S_i2t + (1 − α) S_t2i)."""
    dev = resolve_device(device, "evaluation.device")
    precision = resolve_precision(precision, dev, "evaluation.precision")
    log.info("scoring precision %s", precision)
    _, models = load_parts(checkpoint, dev)
    image_rows, caption_rows, cap_image = split_rows(corpus, split)
    weights = [getattr(m, "fusion_weight", None) for m in models]
    weighted = all(w is not None for w in weights)
    sim = None
    for k, (m, w) in enumerate(zip(models, weights, strict=True)):
        s = similarity(m, corpus, image_rows, caption_rows, image_batch, caption_batch, num_workers,
                       desc=f"{split} part {k + 1}/{len(models)}", precision=precision)
        check_finite_similarity(s, f"{checkpoint} part {k + 1}/{len(models)} on the {split} split")
        if weighted:
            s *= np.float32(w)
        sim = s if sim is None else sim + s
    if not weighted:
        sim /= len(models)
    return protocols(sim, cap_image, folds=folds, full=full), len(image_rows), len(caption_rows)


def run_evaluation(model_name: str, checkpoint: str, corpus: Corpus, out_json: str, eval_cfg: dict[str, Any],
                   config: dict[str, Any], code_version: str) -> dict[str, Any]:
    """Test metrics of ``checkpoint`` → ``out_json`` (the contract's metrics.json)."""

    t0 = time.time()
    e = {**schema_defaults("evaluation"), **eval_cfg}  # the schema is the one home of the defaults
    torch.set_num_threads(int(e["threads"]))
    prot, n_img, n_cap = evaluate_checkpoint(
        checkpoint, corpus, split=e["split"], folds=int(e["folds"]), full=bool(e["full"]),
        image_batch=int(e["image_batch"]), caption_batch=int(e["caption_batch"]), num_workers=int(e["num_workers"]),
        device=str(e["device"]), precision=str(e["precision"]))
    out = {"model": model_name, "dataset": config.get("dataset", ""), "variant": config.get("variant"),
           "protocols": prot, "n_images": n_img, "n_captions": n_cap, "checkpoint": str(checkpoint), "config": config,
           "code_version": code_version, "seconds": round(time.time() - t0, 2)}
    for name, p in prot.items():
        log.info("%s %s: i2t R@1 %.1f R@5 %.1f R@10 %.1f | t2i R@1 %.1f R@5 %.1f R@10 %.1f | rSum %.1f", model_name,
                 name, p["i2t"]["r1"], p["i2t"]["r5"], p["i2t"]["r10"], p["t2i"]["r1"], p["t2i"]["r5"],
                 p["t2i"]["r10"], p["rsum"])
    write_json(out_json, out)
    return out
