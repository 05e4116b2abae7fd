"""Model registry: name → class, built from its config block and the data's dimensions."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the workflow reads MODELS at parse time: no torch import for it
    from itmatch.models.base import MatchingModel

MODEL_CLASSES: dict[str, str] = {
    "scan": "itmatch.models.scan:SCAN",
    "pfan": "itmatch.models.pfan:PFAN",
    "caan": "itmatch.models.caan:CAAN",
    "smfea": "itmatch.models.smfea:SMFEA",
    "glfn": "itmatch.models.glfn:GLFN",
    "bssan": "itmatch.models.bssan:BSSAN",
}


#: the registered model names (the workflow's ``{model}`` wildcard follows them)
MODELS: tuple[str, ...] = tuple(MODEL_CLASSES)


def display_name(name: str) -> str:
    """The model's name for people (its class name: ``pfan`` → ``PFAN``)."""
    return MODEL_CLASSES[name].split(":")[1] if name in MODEL_CLASSES else name


def model_class(name: str) -> type[MatchingModel]:
    if name not in MODEL_CLASSES:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODEL_CLASSES)}")
    module, cls = MODEL_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)


#: keys of a model's settings read by the data layer, not by the model class (``TextOptions``)
DATA_KEYS = ("tokens",)


def model_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` without the keys the data layer reads (``tokens``): what the model class is built from."""
    return {k: v for k, v in cfg.items() if k not in DATA_KEYS}


def model_inputs(name: str, cfg: dict[str, Any]) -> frozenset[str]:
    """The optional artifacts (``blocks``, ``tags``, ``bert``, ``trees``, ``concepts``, ``grid``) that model
    ``name`` reads with the resolved settings ``cfg``, beyond regions.h5 and tokens.parquet."""
    return model_class(name).inputs(model_keys(cfg))


def build_model(name: str, cfg: dict[str, Any], data_info: dict[str, Any]) -> MatchingModel:
    """``cfg`` is ``config['models'][name]`` (merged with overrides); ``data_info`` holds the data's
    dimensions: vocab_size, feature_dim, and where relevant blocks_K, bert_dim, tag_dim, n_entities,
    n_relations, n_concepts, n_objects, n_attributes, grid_cells, grid_dim."""
    return model_class(name).from_config(model_keys(cfg), data_info)
