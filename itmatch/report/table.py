"""The results table: every trained (model, dataset)'s test metrics next to the papers' numbers, with the
run's training and evaluation wall time (minutes; from ``train_log.csv`` beside ``metrics.json`` and from
``metrics.json``'s ``seconds``). An ablation variant's run (``metrics.json`` key ``variant``) is a row of its own,
beside the base model's, next to the paper's ablation row (``published.yaml`` key ``model/variant``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from itmatch.models.registry import display_name
from itmatch.report.published import DIRECTIONS, RECALLS, published_rsum

COLUMNS = ["model", "variant", "dataset", "protocol", "source",
           "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "train_min", "eval_min"]
DATASET_NAMES = {"coco": "MS-COCO", "f30k": "Flickr30K", "shapes": "shapes"}


def read_metrics(path: str | Path) -> dict[str, Any]:
    """One ``metrics.json`` (docs/contract.md), checked for the keys the table needs."""
    path = Path(path)
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    for key in ("model", "dataset", "protocols"):
        if key not in m:
            raise ValueError(f"{path}: missing key {key!r}")
    for proto, p in m["protocols"].items():
        for d in DIRECTIONS:
            for k in RECALLS:
                if k not in p.get(d, {}):
                    raise ValueError(f"{path}: missing protocols.{proto}.{d}.{k}")
    return m


def train_minutes(train_log: str | Path) -> float | None:
    """Training wall time of a run in minutes: the last ``seconds`` of its ``train_log.csv`` (cumulative over
    resumes), summed over the parts of a fused model (``part`` column); None when there is no log."""
    path = Path(train_log)
    if not path.exists():
        return None
    log = pd.read_csv(path)
    if log.empty or "seconds" not in log:
        return None
    per_part = log.groupby("part")["seconds"].max() if "part" in log else log["seconds"].iloc[[-1]]
    return float(per_part.sum()) / 60


def results_frame(metrics_files: list[str | Path], published: dict) -> pd.DataFrame:
    """One row per (model, dataset, protocol) measured here ("ours"), each followed by the paper's row."""
    rows: list[dict[str, Any]] = []
    for f in metrics_files:
        m = read_metrics(f)
        variant = m.get("variant") or None
        run = {"model": m["model"], "variant": variant, "dataset": m["dataset"]}
        for proto, p in m["protocols"].items():
            ours = {**run, "protocol": proto, "source": "ours"}
            ours |= {f"{d}_{k}": float(p[d][k]) for d in DIRECTIONS for k in RECALLS}
            ours["rsum"] = float(p["rsum"]) if "rsum" in p else sum(ours[f"{d}_{k}"] for d in DIRECTIONS
                                                                     for k in RECALLS)
            ours["train_min"] = train_minutes(Path(f).with_name("train_log.csv"))
            ours["eval_min"] = float(m["seconds"]) / 60 if m.get("seconds") is not None else None
            rows.append(ours)
            key = f"{m['model']}/{variant}" if variant else m["model"]
            paper = published.get(key, {}).get(m["dataset"], {}).get(proto)
            if paper:
                rows.append({**run, "protocol": proto, "source": paper["source"],
                             **{f"{d}_{k}": paper[d].get(k) for d in DIRECTIONS for k in RECALLS},
                             "rsum": published_rsum(paper)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _fmt(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and pd.isna(v)) else f"{v:.1f}"


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-markdown table (README); the papers' rows in italics with their source table; a variant's rows
    are named ``MODEL (variant)``."""
    head = ("| model | dataset | protocol | source | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rSum "
            "| train min | eval min |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in df.itertuples(index=False):
        ours = r.source == "ours"
        nums = [_fmt(getattr(r, c)) for c in COLUMNS[5:]]
        if not ours:
            nums = [n if n == "–" else f"*{n}*" for n in nums]
        src = "this repository" if ours else f"*paper: {r.source}*"
        name = display_name(r.model) + (f" ({r.variant})" if isinstance(r.variant, str) and r.variant else "")
        lines.append(f"| {name} | {DATASET_NAMES.get(r.dataset, r.dataset)} | "
                     f"{r.protocol} | {src} | " + " | ".join(nums) + " |")
    return head + "\n".join(lines) + "\n"
