"""Figures for the report: training curves and recall@K plots (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from itmatch.models.registry import display_name  # noqa: E402
from itmatch.report.published import DIRECTIONS, RECALLS  # noqa: E402
from itmatch.report.table import read_metrics  # noqa: E402
from itmatch.utils.io import atomic_path  # noqa: E402


def _column(df: pd.DataFrame, *names: str, contains: str | None = None) -> str | None:
    """The first column whose lower-cased name is one of ``names`` (or contains ``contains``)."""
    lower = {c.lower(): c for c in df.columns}
    for n in names:
        if n in lower:
            return lower[n]
    if contains:
        for lc, c in lower.items():
            if contains in lc:
                return c
    return None


def read_train_log(path: str | Path) -> pd.DataFrame:
    """``train_log.csv`` (one row per validation): needs an epoch (or step), a loss and an rSum column."""
    path = Path(path)
    df = pd.read_csv(path)
    if df.empty:
        raise ValueError(f"{path}: no rows (training logged no validation)")
    missing = [what for what, col in (("epoch or step", _column(df, "epoch", "step")),
                                      ("loss", _column(df, "loss", "train_loss", contains="loss")),
                                      ("rsum", _column(df, "rsum", "val_rsum", contains="rsum"))) if col is None]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; columns: {', '.join(df.columns)}")
    return df


def plot_training_curves(log_csv: str | Path, out_png: str | Path, title: str) -> None:
    """Two panels: training loss and validation rSum per epoch (per step if validated more often), one line
    per part for fused models (a ``part`` column: t2i, i2t); circles mark each part's best rSum."""
    df = read_train_log(log_csv)
    x = _column(df, "epoch", "step")
    part_col = _column(df, "part")
    keys = [part_col, x] if part_col else [x]
    if _column(df, "step") and df.duplicated(subset=keys).any():  # several validations per epoch
        x = _column(df, "step")
    loss = _column(df, "loss", "train_loss", contains="loss")
    rsum = _column(df, "rsum", "val_rsum", contains="rsum")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    groups = list(df.groupby(part_col, sort=False)) if part_col else [(None, df)]
    for part, g in groups:  # fused models (SCAN, PFAN) log one curve per direction
        label = f"{part}" if part is not None else None
        a.plot(g[x], g[loss], marker="o", label=label)
        b.plot(g[x], g[rsum], marker="o", label=f"rSum {part}" if part is not None else "rSum")
        best = g[rsum].idxmax()
        b.scatter([g[x][best]], [g[rsum][best]], s=120, facecolors="none", edgecolors="k", zorder=3)
    b.scatter([], [], s=120, facecolors="none", edgecolors="k", label="best (checkpoint)")
    a.set(xlabel=x, ylabel="training loss", title="loss")
    b.set(xlabel=x, ylabel="validation rSum", title="validation rSum")
    b.legend(loc="lower right", fontsize=8)
    if part_col:
        a.legend(fontsize=8)
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, out_png)


def plot_recalls(metrics_files: list[str | Path], published: dict[str, Any], out_png: str | Path,
                 dataset: str, protocol: str = "1k") -> None:
    """R@1/5/10 for image→text and text→image per model (lines), the papers' values as hollow markers."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True, constrained_layout=True)
    ks = [1, 5, 10]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n = 0
    for i, f in enumerate(metrics_files):
        m = read_metrics(f)
        if m["dataset"] != dataset or protocol not in m["protocols"]:
            continue
        n += 1
        color = colors[i % len(colors)]
        name = display_name(m["model"])
        paper = published.get(m["model"], {}).get(dataset, {}).get(protocol)
        for ax, d in zip(axes, DIRECTIONS, strict=True):
            ax.plot(ks, [m["protocols"][protocol][d][r] for r in RECALLS], marker="o", color=color, label=name)
            if paper:
                pk = [(k, paper[d][r]) for k, r in zip(ks, RECALLS, strict=True) if paper[d].get(r) is not None]
                ax.plot([k for k, _ in pk], [v for _, v in pk], marker="s", ls=":", color=color, mfc="none",
                        label=f"{name} (paper)")
    if n == 0:
        raise ValueError(f"no metrics for dataset {dataset!r}, protocol {protocol!r} among {len(metrics_files)} files")
    for ax, d in zip(axes, DIRECTIONS, strict=True):
        ax.set(xlabel="K", xticks=ks, title={"i2t": "image → text", "t2i": "text → image"}[d], ylim=(0, 101))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("R@K (%)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Recall@K on {dataset} ({protocol} test protocol)")
    save_figure(fig, out_png)


def save_figure(fig, out_png: str | Path) -> None:
    """Write ``fig`` atomically (format from the suffix, PNG by default) and close it."""
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(out_png).suffix.lstrip(".") or "png")
    plt.close(fig)
