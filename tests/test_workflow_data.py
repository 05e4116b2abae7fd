"""The data stage through Snakemake: plans from a clean checkout, runs, and a rerun has nothing to do."""

from __future__ import annotations

import pandas as pd

from tests.conftest import run_snakemake

TARGET = "results/data/shapes/captions.parquet"


def test_data_stage_runs_once(tmp_path):
    plan = run_snakemake(tmp_path, "-n", TARGET)
    assert "generate_shapes" in plan.stdout and "ingest" in plan.stdout
    run_snakemake(tmp_path, TARGET)
    images = pd.read_parquet(tmp_path / "results/data/shapes/images.parquet")
    captions = pd.read_parquet(tmp_path / "results/data/shapes/captions.parquet")
    assert images["split"].value_counts().to_dict() == {"train": 60, "val": 20, "test": 20}
    assert len(captions) == 500
    assert (tmp_path / "logs/ingest/shapes.log").read_text().count("100%") >= 1
    again = run_snakemake(tmp_path, TARGET)
    assert "Nothing to be done" in again.stdout + again.stderr
