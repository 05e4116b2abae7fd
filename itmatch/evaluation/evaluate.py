"""Encode a split, score it into ``sims.h5`` row block by row block; the metrics are computed from that file.

Generic over models: images and captions are encoded in chunks (``model.encode_images`` / ``encode_captions``,
whatever structure they return) and ``model.score`` is called for every pair of an image chunk and a caption chunk
(:func:`score_blocks`); the encoded captions are held at most ``evaluation.max_caption_mb`` at a time, so memory is
bounded by the settings, not by the size of the split. A checkpoint with several parts (SCAN / PFAN t2i + i2t) is
scored part by part into the same file (each block added to the previous parts' sum read back from it) and the parts'
similarities are averaged (the papers' fusion), or weighted where every part has a ``fusion_weight`` (GLFN); the
float32 operations are those of summing whole matrices, so the file equals the in-memory result. A similarity matrix
with NaN/inf entries is an error (:class:`NonFiniteSimilarityError`): no outputs are written for a diverged model.
``metrics.json``, ``sims.h5`` and ``ranks.parquet`` (:mod:`itmatch.evaluation.outputs`) are written atomically; the
metrics and the ranks are read back from the saved matrix (:func:`itmatch.evaluation.metrics.evaluate_matrix`).
Checkpoints are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itmatch.config import schema_defaults
from itmatch.corpus.data import Corpus, RowDataset, collate_captions, collate_images, loader
from itmatch.evaluation.metrics import Evaluation, evaluate_matrix
from itmatch.evaluation.outputs import SimsFile, create_sims, write_ranks
from itmatch.models.base import Batch, MatchingModel
from itmatch.models.checkpoint import load_parts
from itmatch.utils.device import autocast, resolve_device, resolve_precision, to_device
from itmatch.utils.io import atomic_path, write_json
from itmatch.utils.logs import log, progress


class NonFiniteSimilarityError(FloatingPointError):
    """A similarity matrix holds NaN or inf (a diverged model or corrupted features)."""


def check_finite_similarity(sim: np.ndarray, what: str, row0: int = 0, col0: int = 0) -> None:
    """Raise :class:`NonFiniteSimilarityError` naming ``what``, the count and the first (image, caption) position
    (``sim`` is rows ``row0``…, columns ``col0``… of the matrix)."""
    bad = ~np.isfinite(sim)
    if bad.any():
        i, c = (int(x) for x in np.argwhere(bad)[0])
        rows = f" in rows {row0}..{row0 + sim.shape[0]}" if row0 else ""
        raise NonFiniteSimilarityError(f"{what}: the similarity matrix has {int(bad.sum())} non-finite value(s) of "
                                       f"{sim.size}{rows} (first at image {row0 + i}, caption {col0 + c}: "
                                       f"{sim[i, c]})")


def model_device(model: MatchingModel) -> torch.device:
    return next(iter(model.parameters())).device


def _nbytes(x: Any) -> int:
    """Bytes of the tensors in an encoded batch (a tensor, or dicts / lists / tuples of them)."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


@torch.no_grad()
def _score_images(model: MatchingModel, image_batches: Iterable[Batch], caps: list[Any], precision: str,
                  desc: str | None) -> Iterator[np.ndarray]:
    """Each image batch encoded and scored against the encoded caption chunks ``caps`` → float32 rows."""
    dev = model_device(model)
    for batch in (image_batches if desc is None else progress(image_batches, desc=desc, unit="image chunk")):
        with autocast(dev, precision):
            img = model.encode_images(to_device(batch, dev))
            row = [model.score(img, cap).float().cpu().numpy() for cap in caps]
        yield np.concatenate(row, axis=1) if row else np.zeros((0, 0), np.float32)


@torch.no_grad()
def score_batches(model: MatchingModel, image_batches: Iterable[Batch], caption_batches: Iterable[Batch],
                  precision: str = "fp32", desc: str | None = "score") -> Iterator[np.ndarray]:
    """For every image batch in turn, its float32 rows [n_i, C] against all the captions (encoded once, first);
    encoding and scoring under ``precision`` (a resolved one: fp32 | bf16 | fp16); a progress bar named ``desc``
    (none when None)."""
    model.eval()
    dev = model_device(model)
    with autocast(dev, precision):
        caps = [model.encode_captions(to_device(b, dev)) for b in caption_batches]
    yield from _score_images(model, image_batches, caps, precision, desc)


@torch.no_grad()
def score_blocks(model: MatchingModel, corpus: Corpus, image_rows: np.ndarray, caption_rows: np.ndarray,
                 image_batch: int = 128, caption_batch: int = 512, num_workers: int = 0, desc: str = "score",
                 precision: str = "fp32", max_caption_mb: float | None = None
                 ) -> Iterator[tuple[int, int, np.ndarray]]:
    """(first row, first column, float32 block [n_i, n_c]) of the similarity matrix, one image chunk at a time.

    The encoded captions are held ``max_caption_mb`` at a time (None: all of them): captions are encoded chunk by
    chunk until that budget is reached, then every image chunk is encoded and scored against them, and so on with
    the next captions (images are encoded once per group of captions). Memory is then bounded by the settings,
    not by the size of the split."""
    model.eval()
    dev = model_device(model)
    pin = dev.type == "cuda"
    caption_batches = loader(RowDataset(corpus, caption_rows, "captions"), batch_size=caption_batch,
                             num_workers=num_workers, collate=collate_captions, pin_memory=pin)
    budget = None if not max_caption_mb else float(max_caption_mb) * 2**20

    def images() -> Iterable[Batch]:
        return loader(RowDataset(corpus, image_rows, "images"), batch_size=image_batch, num_workers=num_workers,
                      collate=partial(collate_images, float16=pin), pin_memory=pin)

    def group_rows(caps: list[Any], c0: int, part: str) -> Iterator[tuple[int, int, np.ndarray]]:
        i0 = 0
        for s in _score_images(model, images(), caps, precision, f"{desc}{part}"):
            yield i0, c0, s
            i0 += s.shape[0]

    caps: list[Any] = []
    size, c0, done, groups = 0, 0, 0, 0
    for b in caption_batches:
        with autocast(dev, precision):
            caps.append(model.encode_captions(to_device(b, dev)))
        size += _nbytes(caps[-1])
        done = min(len(caption_rows), done + caption_batch)
        if budget is not None and size >= budget and done < len(caption_rows):
            groups += 1
            log.info("%s: encoded captions %d..%d (%.0f MB, evaluation.max_caption_mb %s) scored as one group",
                     desc, c0, done, size / 2**20, max_caption_mb)
            yield from group_rows(caps, c0, f" captions {c0}..{done}")
            caps, size, c0 = [], 0, done
    yield from group_rows(caps, c0, f" captions {c0}..{done}" if groups else "")


def similarity(model: MatchingModel, corpus: Corpus, image_rows: np.ndarray, caption_rows: np.ndarray,
               image_batch: int = 128, caption_batch: int = 512, num_workers: int = 0, desc: str = "score",
               precision: str = "fp32", max_caption_mb: float | None = None) -> np.ndarray:
    """[len(image_rows), len(caption_rows)] float32 similarities in memory (validation during training)."""
    sim = np.zeros((len(image_rows), len(caption_rows)), dtype=np.float32)
    for i0, c0, s in score_blocks(model, corpus, image_rows, caption_rows, image_batch, caption_batch, num_workers,
                                  desc, precision, max_caption_mb):
        sim[i0:i0 + s.shape[0], c0:c0 + s.shape[1]] = s
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


def fusion_weights(models: list[MatchingModel]) -> list[float] | None:
    """The parts' ``fusion_weight`` where every part has one (GLFN eq. 33: α S_i2t + (1 − α) S_t2i), else None
    (the parts' similarities are averaged)."""
    weights = [getattr(m, "fusion_weight", None) for m in models]
    return [float(w) for w in weights] if all(w is not None for w in weights) else None


def fuse_block(prev: np.ndarray | None, s: np.ndarray, k: int, n_parts: int, weights: list[float] | None
               ) -> np.ndarray:
    """Part ``k``'s rows ``s`` added to the previous parts' sum ``prev``: weighted, or averaged after the last part
    (the same float32 operations as summing the whole matrices)."""
    if weights is not None:
        s = s * np.float32(weights[k])
    out = s if prev is None else prev + s
    if weights is None and k == n_parts - 1:
        out = out / np.float32(n_parts)
    return out


def write_similarity(models: list[MatchingModel], corpus: Corpus, split: str, out: str | Path,
                     image_batch: int = 128, caption_batch: int = 512, num_workers: int = 0,
                     precision: str = "fp32", what: str = "", attrs: dict[str, Any] | None = None,
                     max_caption_mb: float | None = None) -> None:
    """Score the ``split`` of ``corpus`` with the (fused) ``models`` into ``sims.h5`` at ``out`` (atomically),
    block by block (:func:`score_blocks`)."""
    image_rows, caption_rows, cap_image = split_rows(corpus, split)
    weights = fusion_weights(models)
    image_ids = corpus.image_ids[image_rows]
    meta = {**(attrs or {}), "split": split, "parts": len(models), "precision": precision,
            "fusion": "weighted" if weights is not None else "mean"}
    if weights is not None:
        meta["fusion_weights"] = weights
    with atomic_path(out) as tmp:
        f = create_sims(tmp, image_ids, corpus.caption_ids[caption_rows], image_ids[cap_image], meta)
        try:
            ds = f["sims"]
            for k, m in enumerate(models):
                part = f"{what} part {k + 1}/{len(models)} on the {split} split"
                for i0, c0, s in score_blocks(m, corpus, image_rows, caption_rows, image_batch, caption_batch,
                                              num_workers, desc=f"{split} part {k + 1}/{len(models)}",
                                              precision=precision, max_caption_mb=max_caption_mb):
                    check_finite_similarity(s, part.strip(), i0, c0)
                    block = np.s_[i0:i0 + s.shape[0], c0:c0 + s.shape[1]]
                    ds[block] = fuse_block(ds[block] if k else None, s, k, len(models), weights)
        finally:
            f.close()


def evaluate_sims(path: str | Path, folds: int = 1, full: bool = False) -> Evaluation:
    """The protocols and every query's ranks, computed from a saved ``sims.h5`` (read in row blocks)."""
    with SimsFile(path) as sims:
        return evaluate_matrix(sims.rows, sims.shape[0], sims.cap_image, folds=folds, full=full)


def evaluate_checkpoint(checkpoint: str, corpus: Corpus, split: str = "test", folds: int = 1, full: bool = False,
                        image_batch: int = 128, caption_batch: int = 512, num_workers: int = 0, device: str = "cpu",
                        precision: str = "fp32", sims_path: str | Path | None = None,
                        max_caption_mb: float | None = None) -> tuple[dict[str, Any], int, int]:
    """(protocols block, n_images, n_captions) of a checkpoint on a split, computed from its similarity matrix
    saved at ``sims_path`` (a temporary file when None)."""
    dev = resolve_device(device, "evaluation.device")
    precision = resolve_precision(precision, dev, "evaluation.precision")
    log.info("scoring precision %s", precision)
    _, models = load_parts(checkpoint, dev)
    with tempfile.TemporaryDirectory(prefix="itmatch-eval-") as tmp:
        path = Path(sims_path) if sims_path is not None else Path(tmp) / "sims.h5"
        write_similarity(models, corpus, split, path, image_batch, caption_batch, num_workers, precision,
                         what=str(checkpoint), attrs={"checkpoint": str(checkpoint)}, max_caption_mb=max_caption_mb)
        ev = evaluate_sims(path, folds, full)
        with SimsFile(path) as sims:
            n_img, n_cap = sims.shape
    return ev.protocols, n_img, n_cap


def run_evaluation(model_name: str, checkpoint: str, corpus: Corpus, out_json: str, eval_cfg: dict[str, Any],
                   config: dict[str, Any], code_version: str, sims_path: str | Path | None = None,
                   ranks_path: str | Path | None = None) -> dict[str, Any]:
    """Test metrics of ``checkpoint`` → ``out_json`` (the contract's metrics.json), with the similarity matrix
    ``sims_path`` and the per-query ranks ``ranks_path`` (default: ``sims.h5`` / ``ranks.parquet`` beside it)."""

    t0 = time.time()
    e = {**schema_defaults("evaluation"), **eval_cfg}  # the schema is the one home of the defaults
    torch.set_num_threads(int(e["threads"]))
    here = Path(out_json).parent
    sims_path = Path(sims_path) if sims_path is not None else here / "sims.h5"
    ranks_path = Path(ranks_path) if ranks_path is not None else here / "ranks.parquet"
    dev = resolve_device(str(e["device"]), "evaluation.device")
    precision = resolve_precision(str(e["precision"]), dev, "evaluation.precision")
    log.info("scoring precision %s", precision)
    _, models = load_parts(checkpoint, dev)
    write_similarity(models, corpus, str(e["split"]), sims_path, int(e["image_batch"]), int(e["caption_batch"]),
                     int(e["num_workers"]), precision, what=str(checkpoint),
                     attrs={"model": model_name, "dataset": config.get("dataset", ""), "checkpoint": str(checkpoint),
                            "folds": int(e["folds"]), "code_version": code_version},
                     max_caption_mb=e["max_caption_mb"])
    ev = evaluate_sims(sims_path, int(e["folds"]), bool(e["full"]))
    with SimsFile(sims_path) as sims:
        write_ranks(ranks_path, ev, sims)
        n_img, n_cap = sims.shape
    prot = ev.protocols
    out = {"model": model_name, "dataset": config.get("dataset", ""), "variant": config.get("variant"),
           "protocols": prot, "n_images": n_img, "n_captions": n_cap, "checkpoint": str(checkpoint), "config": config,
           "code_version": code_version, "seconds": round(time.time() - t0, 2)}
    for name, p in prot.items():
        log.info("%s %s: i2t R@1 %.1f R@5 %.1f R@10 %.1f | t2i R@1 %.1f R@5 %.1f R@10 %.1f | rSum %.1f", model_name,
                 name, p["i2t"]["r1"], p["i2t"]["r5"], p["i2t"]["r10"], p["t2i"]["r1"], p["t2i"]["r5"],
                 p["t2i"]["r10"], p["rsum"])
    write_json(out_json, out)
    return out
