"""End to end on tiny shapes: raw data → ... → results/pfan/shapes/metrics.json; then nothing to do; then a
PFAN hyperparameter change reruns PFAN training and evaluation only."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_snakemake

TARGET = "results/pfan/shapes/metrics.json"


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake run / dry run → {rule: count}."""
    m = re.search(r"Job stats:\n\s*job\s+count\n[- ]+\n(.*?)\n\s*total\s+\d+", output, re.S)
    if not m:
        return {}
    return {line.split()[0]: int(line.split()[1]) for line in m.group(1).strip().splitlines()}


@pytest.mark.slow
def test_pfan_shapes_end_to_end(tmp_path):
    dry = run_snakemake(tmp_path, "-n", TARGET, check=False)
    out = dry.stdout + dry.stderr
    if dry.returncode != 0 and "MissingInputException" in out:
        pytest.skip("an upstream stage of the DAG is not available yet:\n" + out[-800:])
    assert dry.returncode == 0, out[-4000:]
    run_snakemake(tmp_path, TARGET)
    metrics = json.loads((tmp_path / TARGET).read_text())
    assert set(metrics) == {"model", "dataset", "protocols", "n_images", "n_captions", "checkpoint", "config",
                            "code_version", "seconds", "variant"}
    assert metrics["model"] == "pfan" and metrics["dataset"] == "shapes" and metrics["variant"] is None
    one = metrics["protocols"]["1k"]
    assert one["folds"] == 1 and set(one) == {"i2t", "t2i", "rsum", "folds"}
    assert set(one["i2t"]) == {"r1", "r5", "r10", "medr", "meanr"}
    assert metrics["n_images"] == 20 and metrics["n_captions"] == 100
    log = (tmp_path / "results/pfan/shapes/train_log.csv").read_text().splitlines()
    assert log[0].startswith("part,epoch,step,loss") and len(log) == 1 + 2 * 2  # 2 parts × 2 epochs
    again = run_snakemake(tmp_path, TARGET)
    assert "Nothing to be done" in again.stdout + again.stderr
    change = run_snakemake(tmp_path, "-n", TARGET, "--config", 'models={"pfan": {"position_norm": "softmax"}}')
    jobs = job_counts(change.stdout + change.stderr)
    assert jobs == {"train_part": 2, "fuse_parts": 1, "evaluate": 1}, jobs
