"""Precise reruns: a change to one stage's parameters or code reruns that stage and its dependants only.

The tiny DAG is laid out once without running it: every output of a dry-run plan is created as an empty
placeholder, then `snakemake --touch` records each job's parameters, code hashes and inputs as if it had
run. Each test changes one thing and reads which jobs a dry-run (`--rerun-triggers params code input
mtime`, i.e. all of them) would rerun.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TEST_CONFIG
from tests.test_profiles import workflow_rules

CANDIDATES = [  # the tiny DAG's targets, as far as the workflow can plan them
    "results/data/shapes/captions.parquet",
    "results/features/shapes/regions.h5",
    "results/features/shapes/blocks.h5",
    "results/features/shapes/tags.h5",
    "results/text/shapes/tokens.parquet",
    "results/text/shapes/trees.parquet",
    "results/text/shapes/bert.h5",
    *(f"results/{m}/shapes/metrics.json" for m in ("scan", "pfan", "caan", "smfea", "glfn", "bssan")),
]
TRIGGERS = ["--rerun-triggers", "params", "code", "input", "mtime", "software-env"]


def snapshot(dest: Path, src: Path = REPO) -> Path:
    """A copy of the workflow and package (edits elsewhere during the tests must not change the answers)."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".venv", ".git", "results", "resources", "logs",
                                                             ".snakemake", "__pycache__", "*.egg-info"))
    return dest


def snakemake(workdir: Path, *args: str, snakefile: Path | None = None,
              overrides: dict | None = None) -> subprocess.CompletedProcess:
    """Snakemake on the snapshot next to ``workdir`` (or ``snakefile``), with the tiny test config."""
    snakefile = snakefile or workdir.parent / "repo" / "Snakefile"
    repo = snakefile.parent
    configs = [str(repo / "config" / "config.yaml"), str(repo / TEST_CONFIG.relative_to(REPO))]
    if overrides:
        extra = workdir.parent / f"override-{abs(hash(repr(overrides)))}.yaml"
        extra.write_text(yaml.safe_dump(overrides))
        configs.append(str(extra))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir), "--cores", "1",
           *args, "--configfile", *configs]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def planned_jobs(proc: subprocess.CompletedProcess) -> list[tuple[str, list[str]]]:
    """(rule, outputs) of every job a dry-run plans."""
    out = proc.stdout + proc.stderr
    jobs = []
    for rule, body in re.findall(r"^(?:local)?rule (\w+):\n(.*?)(?=^\S|\Z)", out, flags=re.M | re.S):
        m = re.search(r"^\s+output: (.*)$", body, flags=re.M)
        jobs.append((rule, [o.strip() for o in m.group(1).split(",")] if m else []))
    return jobs


def directory_patterns() -> list[re.Pattern]:
    pats = []
    for r in workflow_rules().values():
        for o in r.get("directory_outputs", []):
            pats.append(re.compile(re.sub(r"\\\{[^}]+\\\}", ".+", re.escape(o)) + "$"))
    return pats


@pytest.fixture(scope="module")
def laid_out(tmp_path_factory) -> tuple[Path, list[str], set[str]]:
    """A workdir where the whole tiny DAG is up to date (placeholders + --touch); its targets and rules."""
    root = tmp_path_factory.mktemp("reruns")
    snapshot(root / "repo")
    workdir = root / "work"
    workdir.mkdir()
    plan = snakemake(workdir, "-n", *CANDIDATES)
    targets = list(CANDIDATES)
    if plan.returncode != 0:  # a stage is missing: the targets a dry-run can plan one by one
        targets = [t for t in CANDIDATES if snakemake(workdir, "-n", t).returncode == 0]
        plan = snakemake(workdir, "-n", *targets)
    assert plan.returncode == 0, plan.stderr[-3000:]
    dirs = directory_patterns()
    for _, outputs in planned_jobs(plan):
        for o in outputs:
            p = workdir / o
            if any(d.match(o) for d in dirs):
                p.mkdir(parents=True, exist_ok=True)
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()
    touch = snakemake(workdir, *targets, "--touch", "--forceall")  # records params, code, inputs
    assert touch.returncode == 0, touch.stderr[-3000:]
    again = snakemake(workdir, "-n", *targets, *TRIGGERS)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]
    return workdir, targets, {rule for rule, _ in planned_jobs(plan)}


def test_block_grid_reruns_blocks_and_the_models_that_read_them(laid_out):
    workdir, targets, rules = laid_out
    if "blocks" not in rules:
        pytest.skip("the block index is not part of the tiny DAG yet")
    proc = snakemake(workdir, "-n", *targets, *TRIGGERS, overrides={"blocks": {"K": 8}})
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = planned_jobs(proc)
    assert "blocks" in {rule for rule, _ in jobs}
    # Only the models that read blocks.h5 (PFAN, GLFN) follow.
    for rule, outputs in jobs:
        assert all(o == "results/features/shapes/blocks.h5" or o.startswith(("results/pfan/", "results/glfn/"))
                   for o in outputs), (rule, outputs)
    outs = {o for _, os_ in jobs for o in os_}
    assert {t for t in targets if t.startswith(("results/pfan/", "results/glfn/"))} <= outs


def test_detector_config_reruns_extraction_and_everything_downstream(laid_out):
    workdir, targets, rules = laid_out
    if "extract_regions_shard" not in rules:
        pytest.skip("extraction is not part of the tiny DAG yet")
    proc = snakemake(workdir, "-n", *targets, *TRIGGERS,
                     overrides={"detector": {"inference": {"conf_thresh": 0.25}}})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {rule for rule, _ in planned_jobs(proc)}
    assert {"extract_regions_shard", "gather_regions"} <= got
    # (train_detector may rerun too: its val mAP uses the inference settings.)
    assert not got & {"generate_shapes", "ingest", "tokenize", "referral_trees", "bert_features"}
    for downstream in ("blocks", "tag_vectors"):
        if downstream in rules:
            assert downstream in got
    # Every model trained on the extracted regions reruns.
    assert {t for t in targets if t.endswith("metrics.json")} <= {o for _, outs in planned_jobs(proc) for o in outs}


def test_pfan_hyperparameter_reruns_pfan_only(laid_out):
    workdir, targets, rules = laid_out
    if "results/pfan/shapes/metrics.json" not in targets:
        pytest.skip("PFAN is not part of the tiny DAG yet")
    pfan = yaml.safe_load((workdir.parent / "repo" / "config" / "config.yaml").read_text())["models"]["pfan"]
    shapes = (pfan.get("datasets") or {}).get("shapes") or {}
    key = "max_term" if "max_term" in pfan else next(
        k for k, v in pfan.items() if isinstance(v, int | float) and not isinstance(v, bool) and k not in shapes)
    proc = snakemake(workdir, "-n", *targets, *TRIGGERS, overrides={"models": {"pfan": {key: pfan[key] + 0.5}}})
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = planned_jobs(proc)
    assert jobs
    for rule, outputs in jobs:
        assert all(o.startswith(("results/pfan/", "logs/")) for o in outputs), (rule, outputs)


def test_editing_the_tokenizer_reruns_text_and_models(laid_out, tmp_path):
    workdir, targets, rules = laid_out
    copy = snapshot(tmp_path / "repo", src=workdir.parent / "repo")
    tok = copy / "itmatch" / "text" / "tokenize.py"
    tok.write_text(tok.read_text() + "\n_AN_EDIT = 1\n")
    proc = snakemake(workdir, "-n", *targets, *TRIGGERS, snakefile=copy / "Snakefile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {rule for rule, _ in planned_jobs(proc)}
    assert "tokenize" in got
    assert not got & {"generate_shapes", "ingest", "extract_regions_shard", "gather_regions", "blocks",
                      "referral_trees", "train_detector"}
    outs = {o for _, os_ in planned_jobs(proc) for o in os_}
    assert {t for t in targets if t.endswith("metrics.json")} <= outs  # every model reads tokens.parquet


def edited_plan(laid_out, copy: Path, edits: dict[str, Callable[[str], str]]) -> set[tuple[str, str]]:
    """(rule, output) of the jobs a dry-run plans after applying ``edits`` (path under itmatch/ → new text)."""
    workdir, targets, _ = laid_out
    snapshot(copy, src=workdir.parent / "repo")
    for module, edit in edits.items():
        f = copy / "itmatch" / module
        f.write_text(edit(f.read_text()))
    proc = snakemake(workdir, "-n", *targets, *TRIGGERS, snakefile=copy / "Snakefile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {(rule, o) for rule, outs in planned_jobs(proc) for o in outs}


def test_editing_the_tree_builder_retrains_smfea_not_pfan(laid_out, tmp_path):
    """Code versions follow the import graph: SMFEA's tree encoder imports itmatch.text.trees, PFAN does not."""
    if "results/smfea/shapes/metrics.json" not in laid_out[1]:
        pytest.skip("SMFEA is not part of the tiny DAG yet")
    jobs = edited_plan(laid_out, tmp_path / "repo", {"text/trees.py": lambda s: s + "\n_AN_EDIT = 1\n"})
    rules = {rule for rule, _ in jobs}
    outs = {o for _, o in jobs}
    assert {"referral_trees", "train_model", "evaluate"} <= rules
    assert "results/smfea/shapes/metrics.json" in outs
    assert not {o for o in outs if o.startswith(("results/pfan/", "results/scan/", "results/caan/"))}, sorted(outs)
    assert not rules & {"generate_shapes", "ingest", "tokenize", "extract_regions_shard", "blocks"}


def test_editing_comments_and_docstrings_reruns_nothing(laid_out, tmp_path):
    def reword_docstrings(text: str) -> str:
        return text.replace('"""', '""" Reworded. ', 1) + "\n# only a comment\n"

    jobs = edited_plan(laid_out, tmp_path / "repo", {"text/tokenize.py": reword_docstrings,
                                                     "training/loop.py": reword_docstrings})
    assert not jobs, sorted(jobs)


def test_code_hash_follows_edits_within_one_process(tmp_path):
    """code hashes are cached per file version (mtime, size): an edit in the same process changes the hash, a
    comment does not."""
    import os

    from itmatch.utils.hashing import code_hash

    script = tmp_path / "job.py"
    script.write_text("x = 1\n")
    first = code_hash(script)
    assert code_hash(script) == first
    script.write_text("x = 2\n")
    os.utime(script, ns=(1, 1))  # even with an old mtime, the size or time differs from the cached version
    second = code_hash(script)
    assert second != first
    script.write_text("x = 2  # a comment\n")
    assert code_hash(script) == second


def test_workflow_helpers_do_not_import_torch():
    """What the Snakefile imports at parse time stays free of torch (seconds on every snakemake command)."""
    code = ("import sys, itmatch.config, itmatch.models.registry, itmatch.utils.device, itmatch.utils.hashing; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"
