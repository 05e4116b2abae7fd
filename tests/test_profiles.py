"""Profiles: the workflow default profile (local) and the SLURM profile; every rule declares resources."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests.conftest import REPO, TEST_CONFIG, run_snakemake

DEFAULT_PROFILE = REPO / "workflow" / "profiles" / "default"
SLURM_PROFILE = REPO / "workflow" / "profiles" / "slurm"

# Loads the workflow through Snakemake's API and prints, per rule, what the tests check.
_RULES_INFO = r"""
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.io import is_flagged
from snakemake.settings.types import (ConfigSettings, DeploymentSettings, OutputSettings, ResourceSettings,
                                      StorageSettings, WorkflowSettings)
repo, workdir, resources = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
configs = [Path(p) for p in sys.argv[4:]]
with SnakemakeApi(OutputSettings()) as api:
    wf = api.workflow(resource_settings=ResourceSettings(cores=1, resources=resources),
                      config_settings=ConfigSettings(configfiles=configs),
                      storage_settings=StorageSettings(), workflow_settings=WorkflowSettings(),
                      deployment_settings=DeploymentSettings(), snakefile=repo / "Snakefile", workdir=workdir)._workflow
    class WC(dict):  # as snakemake's Wildcards: a missing name is an AttributeError
        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

    wc = WC(dataset="shapes", model="pfan", part="t2i")

    def gpu(v):
        v = getattr(v, "_value", v)  # a snakemake.resources.Resource: its value or function
        try:
            return v(wc) if callable(v) else v
        except Exception as e:  # a wildcard these rules do not have
            return f"<{type(e).__name__}>"

    out = {}
    for r in wf.rules:
        res = {k: (v if isinstance(v, int | float | str) else "<function>") for k, v in r.resources.items()}
        out[r.name] = {"conda": r.conda_env if isinstance(r.conda_env, str | None) else str(r.conda_env),
                       "resources": res, "threads": res.get("_cores"),
                       "params": list(r.params._names) if r.params is not None else [],
                       "script": r.script, "shell": r.shellcmd,
                       "is_job": bool(r.script or r.shellcmd or r.notebook or r.wrapper or r.run_func and not r.norun),
                       "local": r.name in wf._localrules, "file": str(r.snakefile),
                       "directory_outputs": [str(o) for o in r.output if is_flagged(o, "directory")],
                       "gpu": gpu(r.resources["gpu"] if "gpu" in r.resources else 0)}
    out["__global__"] = {"gpu": wf.global_resources["gpu"].value if "gpu" in wf.global_resources else None}
    print("RULES-JSON" + json.dumps(out))
"""


def load_rules(gpus: int, *configs: Path, resources: dict | None = None) -> dict[str, dict]:
    """name → {conda, resources, threads, params, script, shell, is_job, local, file} of every rule, plus
    ``__global__`` (the workflow's resource caps), as a local run sees them on a machine with ``gpus`` GPUs."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES" and not k.startswith("SLURM_")}
    env["ITMATCH_SIMULATED_GPUS"] = str(gpus)
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.run([sys.executable, "-c", _RULES_INFO, str(REPO), workdir, json.dumps(resources or {}),
                               str(REPO / "config" / "config.yaml"), str(TEST_CONFIG), *map(str, configs)],
                              capture_output=True, text=True, timeout=120, env=env)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("RULES-JSON")]
    if proc.returncode or not marker:
        raise AssertionError(f"could not load the workflow:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(marker[0][len("RULES-JSON"):])


@functools.cache
def workflow_rules() -> dict[str, dict]:
    """Every rule as on a machine with a GPU (so the rules that may use one declare it)."""
    return {k: v for k, v in load_rules(1).items() if k != "__global__"}


def job_rules() -> dict[str, dict]:
    """Rules that run something (not pure targets such as report_all)."""
    return {n: r for n, r in workflow_rules().items() if r["is_job"]}


def declared_gpu_rules() -> set[str]:
    """Rules that declare a GPU (``resources: gpu=1``) under the test config."""
    return {n for n, r in workflow_rules().items() if r["resources"].get("gpu", 0) not in (0, "0")}


def gpu_rules() -> set[str]:
    """Rules that use a GPU where there is one: the SLURM profile gives each gpu=1 + cpus_per_gpu."""
    raw = yaml.safe_load((SLURM_PROFILE / "config.v8+.yaml").read_text())
    return set(raw["set-resources"]) | declared_gpu_rules()


def parse_profile(profile: Path, *argv: str):
    """The options Snakemake's own argument parser reads from ``profile`` (plus ``argv``)."""
    from snakemake.cli import get_argument_parser

    return get_argument_parser(profiles=[str(profile)]).parse_args(list(argv))


def test_every_job_rule_declares_threads_mem_and_runtime():
    rules = job_rules()
    assert {"generate_shapes", "ingest"} <= set(rules)
    for name, r in rules.items():
        assert isinstance(r["threads"], int) or r["threads"] == "<function>", name
        for key in ("mem_mb", "runtime"):
            assert key in r["resources"], f"rule {name} ({r['file']}) does not declare resources {key}"


def test_default_profile_sets_local_defaults():
    args = parse_profile(DEFAULT_PROFILE)  # every key is a valid Snakemake option
    assert args.cores == 2 and args.rerun_incomplete
    assert set(args.default_resources.keys()) >= {"mem_mb", "runtime", "gpu"}
    raw = yaml.safe_load((DEFAULT_PROFILE / "config.v8+.yaml").read_text())
    assert raw["default-resources"] == {"mem_mb": 2000, "runtime": 60, "gpu": 0}
    assert "resources" not in raw  # the local GPU cap follows the machine's GPUs (the workflow sets it)
    # The command line wins over the profile.
    assert parse_profile(DEFAULT_PROFILE, "--cores", "8").cores == 8
    # Snakemake finds it next to the Snakefile (profiles -> workflow/profiles).
    assert (REPO / "profiles" / "default").resolve() == DEFAULT_PROFILE.resolve()


def test_default_profile_is_loaded_automatically(tmp_path):
    proc = run_snakemake(tmp_path, "-n", "results/data/shapes/captions.parquet")
    assert "workflow specific profile" in proc.stderr and "profiles/default" in proc.stderr
    assert "gpu=0" in proc.stdout + proc.stderr  # default-resources reached the jobs


def test_slurm_profile_is_documented_and_complete():
    text = (SLURM_PROFILE / "config.v8+.yaml").read_text()
    assert "snakemake --workflow-profile profiles/slurm results/pfan/coco/metrics.json" in text
    raw = yaml.safe_load(text)
    args = parse_profile(SLURM_PROFILE)  # every key is a valid Snakemake option
    assert args.executor == "slurm" and args.jobs >= 1
    assert set(args.default_resources.keys()) >= {"slurm_account", "slurm_partition", "mem_mb", "runtime"}
    defaults = raw["default-resources"]
    assert defaults["slurm_account"] == "<account>" and defaults["slurm_partition"] == "<partition>"
    assert set(args.set_resources) == set(raw["set-resources"])
    # No mem_mb / runtime per rule in the profile: the rules' own resources are used.
    per_rule = raw["set-resources"]
    for name, res in per_rule.items():
        # the GPU count is the rule's own (gpu=1 exactly when its stage's device may be CUDA), never forced here
        assert "gpu" not in res and res["cpus_per_gpu"] >= 1, name
        assert "mem_mb" not in res and "runtime" not in res, name
    # Every rule that declares a GPU gets GPU settings; no stale names (they would silently do nothing).
    assert declared_gpu_rules() <= set(per_rule)
    assert set(per_rule) <= set(workflow_rules()), set(per_rule) - set(workflow_rules())


def test_local_gpu_cap_follows_the_visible_gpus():
    """The `gpu` cap is the number of visible GPUs (one GPU job per GPU) unless --resources sets it; with no GPU
    there is none, so the GPU-eligible jobs (on the CPU there) are not serialised. Bookings do not change."""
    stages = ("train_part", "evaluate", "extract_regions_shard", "train_detector")
    for gpus, cap in ((0, None), (1, 1), (3, 3)):
        rules = load_rules(gpus)
        assert rules["__global__"]["gpu"] == cap, gpus
        assert {r: rules[r]["gpu"] for r in stages} == dict.fromkeys(stages, 1), gpus
    assert load_rules(3, resources={"gpu": 1})["__global__"]["gpu"] == 1  # --resources gpu=1 wins
    assert load_rules(0, resources={"gpu": 2})["__global__"]["gpu"] == 2
