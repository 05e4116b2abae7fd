"""Shared fixtures: the repository root, tiny shapes datasets, a Snakemake runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_CONFIG = REPO / ".test" / "config" / "config.yaml"


def run_snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 1200,
                  extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the workflow in ``workdir`` with the test config merged over the default one."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(REPO / "config" / "config.yaml"), str(TEST_CONFIG), "--cores", "2",
           *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(extra_env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """A generated tiny `shapes` dataset (JSON + images) shared by the tests that only read it."""
    from itmatch.data.shapes import ShapesSpec, generate

    root = tmp_path_factory.mktemp("shapes")
    generate(ShapesSpec(seed=3, n_train=40, n_val=10, n_test=10, image_size=96), root / "dataset_shapes.json",
             root / "images")
    return root
