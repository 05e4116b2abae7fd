"""Bottom-up-attention region detector (Faster R-CNN, ResNet C4) in pure PyTorch.

Public API used by region extraction:

- :func:`load_detector` — our trained checkpoint (``results/detector/{dataset}/model.pt``) or a published
  detectron2-format bottom-up-attention checkpoint (``.pkl`` / ``.pth``);
- :func:`preprocess` — decode-side resize + normalisation (cheap, runs in DataLoader workers);
- :func:`detect` — batched region extraction (36 fixed or 10–100 adaptive regions per image).
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from itmatch.features.detector.checkpoint import (
    is_own_object,
    load_own,
    load_published,
    read_checkpoint,
    weights_sha256,
)
from itmatch.features.detector.inference import detect, preprocess
from itmatch.features.detector.model import BottomUpDetector, build_model

__all__ = ["load_detector", "preprocess", "detect", "detector_config", "checkpoint_path", "BottomUpDetector"]


def detector_config(section: dict, dataset: str | None = None) -> dict:
    """The ``detector`` config section with ``per_dataset.<dataset>`` merged over it."""
    from itmatch.config import deep_update

    cfg = copy.deepcopy({k: v for k, v in section.items() if k != "per_dataset"})
    if dataset is not None:
        deep_update(cfg, copy.deepcopy((section.get("per_dataset") or {}).get(dataset) or {}))
    return cfg


def checkpoint_path(section: dict, dataset: str, must_exist: bool = True) -> str:
    """``detector.checkpoints.<dataset>``; for a dataset without an entry there, ``detector.default_checkpoint``
    (your own datasets: the configured default, the demo's shapes detector in config/config.yaml). An error names
    the key when it is unset (null) or the file is absent."""
    checkpoints = section.get("checkpoints") or {}
    key = f"detector.checkpoints.{dataset}" if dataset in checkpoints else "detector.default_checkpoint"
    path = checkpoints[dataset] if dataset in checkpoints else section.get("default_checkpoint")
    if not path:
        also = "" if dataset in checkpoints else f" (dataset {dataset!r} has no detector.checkpoints entry)"
        raise FileNotFoundError(f"config key {key} is not set{also}: give the path of a "
                                "bottom-up-attention checkpoint (.pkl/.pth) you downloaded (nothing is downloaded "
                                "automatically)")
    if must_exist and not Path(path).is_file():
        raise FileNotFoundError(f"config key {key}: file {path} does not exist")
    return str(path)


def _read_vocab(path: str | None, key: str, n: int, prefix: str) -> list[str]:
    from itmatch.features.importers import read_names  # here: keeps pandas/h5py out of the detector's import

    if not path:
        return [f"{prefix}{i}" for i in range(n)]
    if not Path(path).is_file():
        raise FileNotFoundError(f"config key detector.vocab.{key}: file {path} does not exist")
    names = read_names(path)
    if len(names) != n:
        raise ValueError(f"config key detector.vocab.{key}: {path} has {len(names)} names, the checkpoint has "
                         f"{n} classes (without background)")
    return names


def load_detector(path: str, cfg: dict, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Load a detector in eval mode on ``device``; ``cfg`` is the ``detector`` section (or a per-dataset variant).

    meta = {detector, weights_sha256, feature_dim, object_names, attribute_names} (names without background).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"detector checkpoint {path} does not exist")
    loaded = read_checkpoint(path)  # read once, for the format check and the weights
    if is_own_object(path, loaded):
        model, obj = load_own(path, loaded)
        if obj["input"] != cfg["input"]:
            raise ValueError(f"{path} was trained with input normalisation {obj['input']}, but config "
                             f"detector.input is {cfg['input']}: they must agree")
        objects, attrs = obj["object_names"], obj["attribute_names"]
        b = model.arch.get("blocks_per_stage") or model.arch.get("depth")
        name = f"itmatch bottom-up Faster R-CNN C4 (blocks {b}, {model.feature_dim}-d), {Path(path).name}"
    else:
        arch = cfg["published"]
        model = build_model(arch)
        load_published(model, path, loaded)
        vocab = cfg.get("vocab") or {}
        objects = _read_vocab(vocab.get("objects"), "objects", arch["num_object_classes"] - 1, "object_")
        attrs = _read_vocab(vocab.get("attributes"), "attributes", arch["num_attribute_classes"] - 1, "attribute_")
        name = f"bottom-up-attention Faster R-CNN R-{arch.get('depth', '?')} C4 with attributes, {Path(path).name}"
    model.eval().to(device)
    meta = {"detector": name, "weights_sha256": weights_sha256(path), "feature_dim": model.feature_dim,
            "object_names": list(objects), "attribute_names": list(attrs)}
    return model, meta

