"""Shared fixtures: the repository root, tiny shapes datasets, a Snakemake runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_CONFIG = REPO / ".test" / "config" / "config.yaml"


#: variables that make jobs claim (and wait for) local GPUs: a workflow test sets them itself or not at all
GPU_ENV = ("CUDA_VISIBLE_DEVICES", "ITMATCH_SIMULATED_GPUS")


@pytest.fixture(scope="session", autouse=True)
def private_gpu_locks(tmp_path_factory):
    """GPU lock files in a folder of this test session's: a job of another run on this machine never makes a
    test wait."""
    old = os.environ.get("ITMATCH_GPU_LOCK_DIR")
    os.environ["ITMATCH_GPU_LOCK_DIR"] = str(tmp_path_factory.mktemp("gpu-locks"))
    yield
    if old is None:
        os.environ.pop("ITMATCH_GPU_LOCK_DIR", None)
    else:
        os.environ["ITMATCH_GPU_LOCK_DIR"] = old


def run_snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 1200,
                  extra_env: dict[str, str] | None = None, configfiles: tuple[Path, ...] = ()
                  ) -> subprocess.CompletedProcess:
    """Run the workflow in ``workdir`` with the test config (then ``configfiles``) merged over the default one."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(REPO / "config" / "config.yaml"), str(TEST_CONFIG), *map(str, configfiles),
           "--cores", "2", *args]
    env = {k: v for k, v in os.environ.items() if k not in GPU_ENV and not k.startswith("SLURM_")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(extra_env or {})})
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


#: a PFAN that learns something in a few minutes on 2 CPU cores (the test config's 60 images and 2 epochs do
#: not: its detector and PFAN stay at chance): 200 train images, a 15-epoch detector, 10 PFAN epochs
TRAINED_PFAN_CONFIG = """\
datasets:
  shapes:
    generator: {n_train: 200, n_val: 20, n_test: 20}
detector:
  training: {epochs: 15}
training:
  datasets:
    shapes: {epochs: 10, lr: 0.001, lr_decay_epochs: 8, warmup_epochs: 2}
"""


@pytest.fixture(scope="session")
def trained_pfan(tmp_path_factory) -> tuple[Path, list[str]]:
    """A workflow directory with results/pfan/shapes trained and evaluated (rSum ≈ 360 of 600 on 20 test images,
    chance ≈ 160), and the config files it was made with (config.yaml, the test config, the override)."""
    workdir = tmp_path_factory.mktemp("trained_pfan")
    extra = workdir / "trained_pfan.yaml"
    extra.write_text(TRAINED_PFAN_CONFIG, encoding="utf-8")
    run_snakemake(workdir, "results/pfan/shapes/metrics.json", configfiles=(extra,), timeout=2400)
    return workdir, [str(REPO / "config" / "config.yaml"), str(TEST_CONFIG), str(extra)]
