"""The data stage through Snakemake: plans from a clean checkout, runs, and a rerun has nothing to do."""

from __future__ import annotations

import shutil

import pandas as pd
import yaml

from tests.conftest import REPO, TEST_CONFIG, run_snakemake

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


def _local_shapes_config(tmp_path, tiny_shapes) -> str:
    """A config file saying the shapes data are the user's own, placed in ``tmp_path/mine``."""
    cfg = tmp_path / "local.yaml"
    cfg.write_text(yaml.safe_dump({"datasets": {"shapes": {"source": "local", "json": "mine/dataset_shapes.json",
                                                           "images": "mine/images"}}}))
    return str(cfg)


def test_local_source_is_never_written(tmp_path, tiny_shapes):
    """source: local: generate_shapes is not in the DAG (not even with --forceall); the user's JSON and images
    are read, never rewritten (same bytes, same mtime) and the ingest uses them."""
    mine = tmp_path / "mine"
    shutil.copytree(tiny_shapes, mine)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(mine.rglob("*")) if p.is_file()}
    cfg = _local_shapes_config(tmp_path, tiny_shapes)
    plan = run_snakemake(tmp_path, "-n", "--forceall", TARGET, "--configfile", str(REPO / "config" / "config.yaml"),
                         str(TEST_CONFIG), cfg)
    assert "ingest" in plan.stdout
    assert "generate_shapes" not in plan.stdout + plan.stderr
    run_snakemake(tmp_path, TARGET, "--configfile", str(REPO / "config" / "config.yaml"), str(TEST_CONFIG), cfg)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(mine.rglob("*")) if p.is_file()}
    assert after == before
    images = pd.read_parquet(tmp_path / "results/data/shapes/images.parquet")
    assert images["split"].value_counts().to_dict() == {"train": 40, "val": 10, "test": 10}  # the user's data
    assert not (tmp_path / "resources").exists()


def test_local_source_missing_files_are_named(tmp_path, tiny_shapes):
    cfg = _local_shapes_config(tmp_path, tiny_shapes)
    (tmp_path / "mine" / "images").mkdir(parents=True)
    proc = run_snakemake(tmp_path, "-n", TARGET, "--configfile", str(REPO / "config" / "config.yaml"),
                         str(TEST_CONFIG), cfg, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert ("datasets.shapes.source is 'local' (your own data, never generated or downloaded) but these are "
            "missing: mine/dataset_shapes.json (datasets.shapes.json)") in out
    assert "generate_shapes" not in out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".snakemake") == ["local.yaml", "mine"]
