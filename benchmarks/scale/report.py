"""The scale rehearsal's runs → the table and the log-log plot of docs/benchmarks.md.

    .venv/bin/python benchmarks/scale/report.py scale_runs/scale1/stages.json scale_runs/scale10/stages.json \\
        scale_runs/scale100/stages.json

Per stage and size: the job's wall seconds, peak memory (MB, PSS of its processes) and output size; the fitted
exponent b of seconds ∝ images^b (least squares in log-log over the sizes measured; stages under
``--min-seconds`` at every size are fixed-cost dominated and get no exponent), and where the full size was not
run, its time extrapolated: by the fitted power for the linear stages, and for evaluation (inherently images ×
captions) by ``a + c·images²`` fitted to the sizes measured (one size: ``c·images²``, an upper bound). Rewrites
the part of ``--doc`` between the markers ``<!-- scale:begin -->`` and ``<!-- scale:end -->``, writes ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"
FULL_IMAGES = 123_287


def exponent(images: list[int], seconds: list[float], min_seconds: float) -> float | None:
    pts = [(math.log(i), math.log(s)) for i, s in zip(images, seconds, strict=True) if s >= min_seconds]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def quadratic_full(images: list[int], seconds: list[float]) -> float:
    """Evaluation's full-size seconds from ``t = a + c·n²`` (least squares; a >= 0; one point: a = 0)."""
    n2 = np.array(images, dtype=float) ** 2
    t = np.array(seconds, dtype=float)
    if len(t) >= 2:
        c, a = np.polyfit(n2, t, 1)
        if a >= 0 and c > 0:
            return float(a + c * FULL_IMAGES**2)
    return float(t[-1] * (FULL_IMAGES**2 / n2[-1]))


def table(runs: list[dict], min_seconds: float) -> tuple[str, dict[str, tuple[list[int], list[float]]]]:
    runs = sorted(runs, key=lambda r: r["images"])
    stages = list(dict.fromkeys(s for r in runs for s in r["stages"] if not s.startswith("generate")))
    head = "| stage | " + " | ".join(f"{r['dataset']}: s / peak MB / out MB" for r in runs)
    head += " | exponent | full size (s) |\n|---|" + "---|" * (len(runs) + 2) + "\n"
    rows, curves = [], {}
    for st in stages:
        cells, xs, ys = [], [], []
        for r in runs:
            m = r["stages"].get(st)
            if m is None:
                cells.append("—")
                continue
            cells.append(f"{m['seconds']:.1f} / {m['peak_mb']:.0f} / {m['output_mb']:.1f}")
            xs.append(r["images"])
            ys.append(max(m["seconds"], 1e-2))
        b = exponent(xs, ys, min_seconds)
        if xs and xs[-1] >= FULL_IMAGES:
            full = f"{ys[-1]:.0f} (measured)"
        elif xs and st.startswith("evaluate"):
            full = f"≈ {quadratic_full(xs, ys):,.0f} (extrapolated, a + c·n²)"
        elif b is not None:
            full = f"≈ {ys[-1] * (FULL_IMAGES / xs[-1]) ** b:.0f} (extrapolated)"
        else:
            full = "fixed cost"
        rows.append(f"| {st} | " + " | ".join(cells) + f" | {'—' if b is None else f'{b:.2f}'} | {full} |")
        curves[st] = (xs, ys)
    return head + "\n".join(rows) + "\n", curves


def plot(curves: dict[str, tuple[list[int], list[float]]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 6))
    colours = plt.get_cmap("tab20").colors
    for k, (st, (xs, ys)) in enumerate(curves.items()):
        if len(xs) >= 2:  # data stages solid, training dashed, evaluation dotted
            style = "--" if st.startswith("train") else ":" if st.startswith("evaluate") else "-"
            ax.loglog(xs, ys, marker="o", linestyle=style, color=colours[k % len(colours)], label=st)
    ax.set_xlabel("images (COCO = 123,287; 5 captions each)")
    ax.set_ylabel("job wall time, s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("scale rehearsal: time vs dataset size per stage")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="stages.json of each size")
    ap.add_argument("--doc", default="docs/benchmarks.md")
    ap.add_argument("--plot", default="docs/scale_rehearsal.png")
    ap.add_argument("--min-seconds", type=float, default=2.0)
    a = ap.parse_args()
    runs = [json.loads(Path(p).read_text()) for p in a.runs]
    text, curves = table(runs, a.min_seconds)
    plot(curves, Path(a.plot))
    machine = runs[0]["machine"]
    sizes = ", ".join(f"{r['dataset']} = {r['images']:,} images / {r['captions']:,} captions" for r in
                      sorted(runs, key=lambda r: r["images"]))
    block = (f"{BEGIN}\nMachine: {machine['cpus']} CPU cores, {machine['memory_gb']} GiB, no GPU. Sizes: {sizes}. "
             f"Training: one epoch capped at {runs[0]['steps']} batches of {runs[0]['batch_size']}.\n\n{text}\n"
             f"![time vs size per stage]({Path(a.plot).name})\n{END}")
    doc = Path(a.doc)
    old = doc.read_text() if doc.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in old:
        old += f"\n{BEGIN}\n{END}\n"
    pre, rest = old.split(BEGIN, 1)
    doc.write_text(pre + block + rest.split(END, 1)[1])
    print(text)


if __name__ == "__main__":
    main()
