"""Which files the report covers, from the config's ``report`` section (used by the report rules)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from itmatch.config import schema_defaults


def report_runs(config: dict[str, Any], dataset: str | None = None) -> list[tuple[str, str]]:
    """(model, dataset) pairs the report covers (``report.models`` × ``report.datasets``), optionally one dataset's."""
    rep = {**schema_defaults("report"), **(config.get("report") or {})}
    return [(m, d) for d in rep["datasets"] for m in rep["models"] if dataset is None or d == dataset]


def report_metrics(config: dict[str, Any], dataset: str | None = None, variants: bool = False,
                   exists: Callable[[str], bool] = os.path.exists) -> list[str]:
    """The metrics.json files of those runs; with ``variants``, each followed by those of the model's ablation
    variants (config ``variants``) as ``report.variants`` says: ``existing`` (the default: the files that
    ``exists`` when the workflow starts, nothing is trained for the report), ``all`` or ``none``."""
    mode = (config.get("report") or {}).get("variants", "existing") if variants else "none"
    out = []
    for m, d in report_runs(config, dataset):
        out.append(f"results/{m}/{d}/metrics.json")
        if mode == "none":
            continue
        for name in (config.get("variants") or {}).get(m) or {}:
            f = f"results/{m}/{d}/{name}/metrics.json"
            if mode == "all" or exists(f):
                out.append(f)
    return out


def report_targets(config: dict[str, Any]) -> list[str]:
    """Everything rule report_all builds: tables, training curves, recall plots, PFAN figures."""
    runs = report_runs(config)
    datasets = sorted({d for _, d in runs})
    return (["results/report/results_table.md", "results/report/results.csv"]
            + [f"results/report/curves/{m}_{d}.png" for m, d in runs]
            + [f"results/report/recall_{d}.png" for d in datasets]
            + [f"results/report/pfan_figure6_{d}.png" for m, d in runs if m == "pfan"])
