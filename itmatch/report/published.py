"""The papers' published numbers (``published.yaml`` next to this module), loaded and checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from itmatch.config import DATASETS
from itmatch.models.registry import MODELS

PUBLISHED_PATH = Path(__file__).resolve().parent / "published.yaml"
DIRECTIONS = ("i2t", "t2i")
RECALLS = ("r1", "r5", "r10")
PROTOCOLS = ("1k", "5k")


def load_published(path: str | Path = PUBLISHED_PATH) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """model → dataset → protocol → {source, i2t: {r1, r5, r10[, medr]}, t2i: {…}, rsum?}; a paper's ablation
    row is keyed ``model/variant`` (the variant of config ``variants.<model>`` that reproduces it).

    Raises ValueError naming the file and the entry on an unknown model/dataset/protocol, a missing
    ``source`` or a recall that is neither a number in [0, 100] nor null.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    for key, per_ds in data.items():
        model = str(key).split("/", 1)[0]
        if model not in MODELS:
            raise ValueError(f"{path}: unknown model {model!r} (known: {', '.join(MODELS)})")
        for ds, per_proto in per_ds.items():
            if ds not in DATASETS:
                raise ValueError(f"{path}: {key}: unknown dataset {ds!r} (known: {', '.join(DATASETS)})")
            for proto, row in per_proto.items():
                where = f"{path}: {key}.{ds}.{proto}"
                if proto not in PROTOCOLS:
                    raise ValueError(f"{where}: unknown protocol (known: {', '.join(PROTOCOLS)})")
                if not isinstance(row.get("source"), str) or not row["source"].strip():
                    raise ValueError(f"{where}: 'source' (paper and table) is required")
                for d in DIRECTIONS:
                    for k in RECALLS:
                        v = (row.get(d) or {}).get(k, "missing")
                        if v is None:
                            continue
                        if not isinstance(v, int | float) or not 0 <= v <= 100:
                            raise ValueError(f"{where}.{d}.{k}: expected a recall in percent or null, got {v!r}")
    return data


def published_rsum(row: dict[str, Any]) -> float | None:
    """The paper's rSum: printed value if any, else the sum of six recalls (None if one is missing)."""
    if row.get("rsum") is not None:
        return float(row["rsum"])
    vals = [row[d].get(k) for d in DIRECTIONS for k in RECALLS]
    return None if any(v is None for v in vals) else round(float(sum(vals)), 1)
