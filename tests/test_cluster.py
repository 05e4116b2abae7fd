"""Cluster submission for real: the tiny workflow through Snakemake's `cluster-generic` executor and a
fake scheduler (a submit script that records its arguments, runs the job script in the background and
prints a job id; a status script), compared with a local run. Plus a SLURM dry-run of the COCO DAG."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, TEST_CONFIG, run_snakemake
from tests.test_profiles import gpu_rules

# The data stage and the referral trees (a GPU rule, cheap on shapes' gold parses). The whole tiny DAG
# (detector training, extraction, blocks, tokens, PFAN) takes minutes twice over: ITMATCH_FULL_CLUSTER_TEST=1.
DATA_TARGETS = ["results/data/shapes/images.parquet", "results/data/shapes/captions.parquet"]
DOWNSTREAM = ["results/text/shapes/trees.parquet"]
if os.environ.get("ITMATCH_FULL_CLUSTER_TEST"):
    DOWNSTREAM += ["results/text/shapes/tokens.parquet", "results/features/shapes/regions.h5",
                   "results/features/shapes/blocks.h5", "results/pfan/shapes/metrics.json"]

SUBMIT = r"""#!/usr/bin/env bash
# Fake scheduler: `submit.sh --rule R --gpus G --mem M --time T --cpus C <jobscript>`
set -eu
dir="$(cd "$(dirname "$0")" && pwd)"
exec 9>"$dir/lock" && flock 9           # job ids from a counter, one submission at a time
id=$(cat "$dir/counter" 2>/dev/null || echo 1000)
echo $(( id + 1 )) > "$dir/counter"
flock -u 9
printf '%s\t%s\n' "$id" "$*" >> "$dir/submissions.tsv"
jobscript="${@: -1}"
# own session: a failing Snakemake job kills its process group, which must not take the exit-code writer along
out="$dir/jobs/$id"
( setsid --wait bash "$jobscript" > "$out.out" 2>&1; echo $? > "$out.exit" ) </dev/null >/dev/null 2>&1 &
echo "$id"
"""

STATUS = r"""#!/usr/bin/env bash
# Fake scheduler status: running | success | failed
dir="$(cd "$(dirname "$0")" && pwd)"
f="$dir/jobs/$1.exit"
if [ ! -f "$f" ]; then echo running; elif [ "$(cat "$f")" = 0 ]; then echo success; else echo failed; fi
"""


def fake_scheduler(root: Path) -> tuple[Path, Path]:
    sched = root / "scheduler"
    (sched / "jobs").mkdir(parents=True)
    paths = []
    for name, text in (("submit.sh", SUBMIT), ("status.sh", STATUS)):
        p = sched / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
        paths.append(p)
    return paths[0], paths[1]


def digest(path: Path) -> str:
    """Content digest: Parquet by its table, HDF5 by its arrays and attributes (files carry creation times),
    JSON without its timings, anything else by its bytes."""
    h = hashlib.sha256()
    if path.suffix == ".parquet":
        h.update(pd.read_parquet(path).to_csv(index=False).encode())
    elif path.suffix == ".h5":
        import h5py

        with h5py.File(path, "r") as f:
            # (weights_sha256 hashes the detector's checkpoint file, which also records training times)
            h.update(repr(sorted((k, str(v)) for k, v in f.attrs.items() if "sha256" not in k)).encode())
            f.visititems(lambda name, obj: h.update(name.encode() + (obj[()].tobytes() if hasattr(obj, "dtype")
                                                                     else b"")))
    elif path.suffix == ".json":
        h.update(json.dumps(_untimed(json.loads(path.read_text())), sort_keys=True).encode())
    else:
        h.update(path.read_bytes())
    return h.hexdigest()


def _untimed(obj):
    """A JSON value without its timing entries (keys like seconds, time, elapsed, load_average)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not re.search(r"second|time|elapsed|load_average", k)}
    return [_untimed(v) for v in obj] if isinstance(obj, list) else obj


COMPARED = (".parquet", ".h5", ".json", ".jpg", ".png")  # model.pt / train_log.csv hold timings


def test_tiny_workflow_through_a_fake_cluster_equals_a_local_run(tmp_path):
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    targets = DATA_TARGETS + DOWNSTREAM
    gpu = gpu_rules()
    run_snakemake(local, *targets)
    submit, status = fake_scheduler(tmp_path)
    proc = run_snakemake(
        cluster, *targets,
        "--executor", "cluster-generic",
        "--cluster-generic-submit-cmd",
        f"{submit} --rule {{rule}} --gpus {{resources.gpu}} --mem {{resources.mem_mb}} "
        f"--time {{resources.runtime}} --cpus {{threads}}",
        "--cluster-generic-status-cmd", str(status),
        "--jobs", "4", "--latency-wait", "5", "--seconds-between-status-checks", "1",
        "--max-status-checks-per-second", "10",
        # As the SLURM profile does: rules that use a GPU where there is one ask the scheduler for one.
        *(["--set-resources", *(f"{r}:gpu=1" for r in sorted(gpu))] if gpu else []),
    )
    subs = [line.split("\t") for line in (tmp_path / "scheduler/submissions.tsv").read_text().splitlines()]
    submitted = [dict(re.findall(r"--(\w+) (\S+)", args)) for _, args in subs]
    # Every job of the plan went through the scheduler, exactly once, and succeeded there.
    planned = re.findall(r"^(?:local)?rule (\w+):", proc.stdout + proc.stderr, flags=re.M)
    assert sorted(s["rule"] for s in submitted) == sorted(planned), proc.stderr[-3000:]
    for job_id, _ in subs:
        assert (tmp_path / f"scheduler/jobs/{job_id}.exit").read_text().strip() == "0"
    # GPU rules asked for a GPU, the others for none; memory and time are the rules' own.
    for s in submitted:
        assert int(s["gpus"]) == (1 if s["rule"] in gpu else 0), s
        assert int(s["mem"]) > 0 and int(s["time"]) > 0 and int(s["cpus"]) >= 1
    assert {s["rule"] for s in submitted} >= {"generate_shapes", "ingest"}
    # Same outputs as the local run.
    for t in targets:
        files = sorted((local / t).rglob("*")) if (local / t).is_dir() else [local / t]
        for f in files:
            if f.is_file() and f.suffix in COMPARED:
                rel = f.relative_to(local)
                assert digest(f) == digest(cluster / rel), rel


def slurm_dry_run(tmp_path: Path, extra_config: str = "", target: str = "results/pfan/coco/metrics.json"
                  ) -> list[tuple[str, str]]:
    """(rule, plan text) of every job `--workflow-profile profiles/slurm -n` plans for ``target`` on COCO."""
    (tmp_path / "resources/coco/images").mkdir(parents=True)
    (tmp_path / "resources/coco/dataset_coco.json").write_text(json.dumps({"images": []}))
    (tmp_path / "resources/coco/bottom-up-attention.pth").touch()  # a published detector checkpoint
    extra = tmp_path / "coco.yaml"
    extra.write_text("detector:\n  checkpoints:\n    coco: resources/coco/bottom-up-attention.pth\n" + extra_config)
    proc = run_snakemake(tmp_path, "-n", "--workflow-profile", str(REPO / "profiles/slurm"),
                         target, "--configfile", str(REPO / "config/config.yaml"),
                         str(TEST_CONFIG), str(extra), check=False)
    out = proc.stdout + proc.stderr
    if f"No rule to produce {target}" in out:
        pytest.skip("the training rules do not exist yet")
    assert proc.returncode == 0, out[-4000:]
    jobs = re.findall(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", out, flags=re.M | re.S)
    assert jobs, out[-3000:]
    return jobs


def test_slurm_dry_run_plans_pfan_on_coco_with_gpus(tmp_path):
    """`--workflow-profile profiles/slurm -n`: the whole COCO → PFAN DAG, GPU resources on GPU rules."""
    jobs = slurm_dry_run(tmp_path)
    gpu = gpu_rules()
    # By default (device: auto) extraction, training and evaluation book a GPU each.
    assert {"extract_regions_shard", "train_part", "evaluate"} <= {name for name, _ in jobs} & gpu
    for name, body in jobs:
        res = dict(re.findall(r"(\w+)=([^,\n]+)", re.search(r"resources: (.*)", body).group(1)))
        assert res["slurm_account"] == "<account>"
        if name in gpu:
            assert res["gpu"] == "1" and int(res["cpus_per_gpu"]) >= 1 and res["slurm_partition"] == "<gpu-partition>"
        else:
            assert res.get("gpu", "0") == "0" and res["slurm_partition"] == "<partition>"
        assert int(res["mem_mb"]) > 0 and int(res["runtime"]) > 0
    planned = {name for name, _ in jobs}
    assert {"ingest"} <= planned and planned & gpu, planned
    # The sbatch lines the SLURM plugin builds for these jobs (its own functions, no sbatch needed).
    for name, body in jobs:
        line = sbatch_line(name, body)
        assert re.search(r"--mem \d+", line) and re.search(r" -t \d+", line), line
        if name in gpu:
            assert "--gpus=1" in line and re.search(r"--cpus-per-gpu=\d+", line), line
        else:
            assert "--gpus" not in line and re.search(r"--cpus-per-task=\d+", line), line


CPU_ONLY = """
extraction: {device: cpu}
training: {device: cpu}
evaluation: {device: cpu}
text: {trees: {device: cpu}, bert: {device: cpu}}
"""


def test_slurm_dry_run_with_device_cpu_books_no_gpu(tmp_path):
    """A CPU-only configuration: no job asks SLURM for a GPU (no gpu resource, no --gpus)."""
    jobs = slurm_dry_run(tmp_path, CPU_ONLY)
    planned = {name for name, _ in jobs}
    assert {"extract_regions_shard", "train_part", "evaluate", "ingest"} <= planned, planned
    for name, body in jobs:
        res = dict(re.findall(r"(\w+)=([^,\n]+)", re.search(r"resources: (.*)", body).group(1)))
        assert res.get("gpu", "0") == "0", (name, res)
        line = sbatch_line(name, body)
        assert "--gpus" not in line and "--cpus-per-gpu" not in line and re.search(r"--cpus-per-task=\d+", line), line


def test_slurm_dry_run_gpu_follows_each_stage_device(tmp_path):
    """Only the stage set to cpu stops booking a GPU; per-dataset overrides count (training.datasets.coco)."""
    jobs = slurm_dry_run(tmp_path, "training: {datasets: {coco: {device: cpu}}}\n")
    gpus = {name: dict(re.findall(r"(\w+)=([^,\n]+)", re.search(r"resources: (.*)", body).group(1))).get("gpu", "0")
            for name, body in jobs}
    assert gpus["train_part"] == "0" and gpus["extract_regions_shard"] == "1" and gpus["evaluate"] == "1", gpus


class _Resources(dict):
    def __getattr__(self, key):
        return self[key]


def sbatch_line(rule: str, plan_body: str) -> str:
    """The plugin's submit command for one planned job (its resources and threads as the dry-run shows them)."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    raw = dict(re.findall(r"(\w+)=([^,\n]+)", re.search(r"resources: (.*)", plan_body).group(1)))
    res = _Resources({k: int(v) if v.isdigit() else v for k, v in raw.items() if v != "<TBD>"})
    threads = int(m.group(1)) if (m := re.search(r"threads: (\d+)", plan_body)) else 1
    job = SimpleNamespace(name=rule, resources=res, threads=threads)
    params = {"run_uuid": "uuid", "slurm_logfile": "log", "comment_str": f"rule_{rule}",
              "account": f"-A {res['slurm_account']}", "partition": f"-p {res['slurm_partition']}", "workdir": "."}
    return get_submit_command(job, params) + set_gres_string(job)
