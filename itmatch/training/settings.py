"""Effective settings of one training run: config sections merged with their per-dataset / per-model overrides.

- ``training``: defaults, then ``training.datasets.<dataset>`` (e.g. COCO's 5e-4 / decay at 10 of 20 epochs),
  then ``training.models.<model>`` (the one place of a model's training overrides), then
  ``training.models.<model>.datasets.<dataset>``.
- ``models.<model>``: the model's block, then ``models.<model>.datasets.<dataset>``; the ``datasets`` and
  ``fuse`` keys are dropped before the model sees its config.
- ``evaluation``: defaults, then ``evaluation.datasets.<dataset>`` (COCO: 5 folds + 5K).
- A dataset with ``recipes: f30k`` / ``coco`` (precomp datasets: SCAN's F30K / COCO features under a name of
  their own) gets that built-in dataset's overrides first, then its own, in each section above.
- Fused models: ``models.<model>.fuse`` lists the directions trained separately (``[t2i, i2t]``); each part
  gets the model config with ``direction`` set.
- :func:`recipe`: the ``training`` and ``model`` settings of one model × dataset together: what the train
  rules use (their ``training`` / ``model_cfg`` params) and what ``itmatch recipe`` prints.
- Variants (``variants.<model>.<name>``, ablations trained under results/{model}/{dataset}/{name}/): after all
  of the above, the variant's ``model`` block is merged over the model settings and its ``training`` block
  (the keys of ``training.models.<model>``: settings, then ``datasets.<dataset>``) over the training settings.
"""

from __future__ import annotations

import copy
from typing import Any

from itmatch.config import deep_update


def _merge(base: dict[str, Any], over: dict[str, Any] | None) -> dict[str, Any]:
    """``over`` merged into a copy of ``base`` (neither is modified)."""
    return deep_update(copy.deepcopy(base), copy.deepcopy(over or {}))


def variant_spec(config: dict[str, Any], model: str, variant: str | None) -> dict[str, Any]:
    """``variants.<model>.<variant>`` (``{}`` for the base model, ``variant`` None or empty); an unknown name is a
    ValueError naming the model's variants."""
    if not variant:
        return {}
    defined = (config.get("variants") or {}).get(model) or {}
    if variant not in defined:
        raise ValueError(f"unknown variant {variant!r} of {model}; defined under config key variants.{model}: "
                         f"{', '.join(defined) or 'none'}")
    return defined[variant] or {}


def recipe_datasets(config: dict[str, Any], dataset: str) -> list[str]:
    """The per-dataset override keys of ``dataset``, in merge order: ``datasets.<dataset>.recipes`` (the built-in
    dataset it takes its recipes from), then itself."""
    block = (config.get("datasets") or {}).get(dataset)
    base = block.get("recipes") if isinstance(block, dict) else None
    return [base, dataset] if base else [dataset]


def _merge_datasets(base: dict[str, Any], per_dataset: dict[str, Any] | None, chain: list[str]) -> dict[str, Any]:
    """``per_dataset[d]`` merged over ``base`` for each dataset key ``d`` of ``chain`` in turn."""
    for d in chain:
        base = _merge(base, (per_dataset or {}).get(d))
    return base


def _with_datasets(base: dict[str, Any], over: dict[str, Any], chain: list[str]) -> dict[str, Any]:
    """``over``'s keys (except ``datasets``) merged over ``base``, then ``over['datasets']`` along ``chain``."""
    base = _merge(base, {k: v for k, v in over.items() if k != "datasets"})
    return _merge_datasets(base, over.get("datasets"), chain)


def training_settings(config: dict[str, Any], model: str, dataset: str, variant: str | None = None
                      ) -> dict[str, Any]:
    t = config.get("training") or {}
    chain = recipe_datasets(config, dataset)
    base = {k: v for k, v in t.items() if k not in ("datasets", "models")}
    base = _merge_datasets(base, t.get("datasets"), chain)
    base = _with_datasets(base, (t.get("models") or {}).get(model) or {}, chain)
    return _with_datasets(base, variant_spec(config, model, variant).get("training") or {}, chain)


def model_settings(config: dict[str, Any], model: str, dataset: str, variant: str | None = None
                   ) -> dict[str, Any]:
    base = _with_datasets({}, (config.get("models") or {}).get(model) or {}, recipe_datasets(config, dataset))
    return _merge(base, variant_spec(config, model, variant).get("model"))


def recipe(config: dict[str, Any], model: str, dataset: str, variant: str | None = None
           ) -> dict[str, dict[str, Any]]:
    """``{"training": ..., "model": ...}``: the resolved settings a training run of ``model`` on ``dataset``
    (or of its ``variant``) uses (``config`` validated with the schema's defaults filled). The train rules read
    exactly this (a fused model's part gets :func:`part_config` of ``model``)."""
    return {"training": training_settings(config, model, dataset, variant),
            "model": model_settings(config, model, dataset, variant)}


def evaluation_settings(config: dict[str, Any], dataset: str) -> dict[str, Any]:
    e = config.get("evaluation") or {}
    base = {k: v for k, v in e.items() if k != "datasets"}
    return _merge_datasets(base, e.get("datasets"), recipe_datasets(config, dataset))


def fused_parts(model_cfg: dict[str, Any]) -> list[str]:
    """Directions trained as separate models (empty: one model, no parts)."""
    return list(model_cfg.get("fuse") or [])


def part_config(model_cfg: dict[str, Any], part: str | None) -> dict[str, Any]:
    cfg = {k: v for k, v in model_cfg.items() if k != "fuse"}
    if part:
        cfg["direction"] = part
    return cfg
