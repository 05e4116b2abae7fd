"""Training: it learns, and a run killed at any moment (SIGKILL / SIGTERM) resumes to the same result."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from itmatch.corpus.data import Corpus, DataPaths
from itmatch.corpus.synthetic import write_synthetic_corpus
from itmatch.evaluation.evaluate import evaluate_checkpoint

MODEL_CFG = {"embed_dim": 16, "word_dim": 8, "block_dim": 4, "direction": "t2i"}
TRAIN_CFG = {"num_workers": 0, "device": "cpu", "precision": "fp32",
             "epochs": 3, "batch_size": 8, "lr": 2e-3, "lr_decay_epochs": 2, "val_max_images": 8,
             "checkpoint_every_steps": 2, "val_every_steps": 7, "threads": 1, "seed": 5}

RUNNER = r"""
import json, sys, time
from itmatch.models.pfan import PFAN
from itmatch.corpus.data import Corpus, DataPaths
from itmatch.training.loop import train_model
args = json.loads(sys.argv[1])
if args["delay"]:
    orig = PFAN.loss
    def slow(self, *a, **k):
        time.sleep(args["delay"])
        return orig(self, *a, **k)
    PFAN.loss = slow
corpus = Corpus(DataPaths(**args["paths"]), frozenset({"blocks"}))
train_model("pfan", args["model"], args["train"], corpus, args["out"] + "/model.pt", args["out"] + "/log.csv",
            args["out"] + "/.state.pt")
"""


@pytest.fixture(scope="module")
def corpus_paths(tmp_path_factory) -> DataPaths:
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), n_train=16, n_val=8, n_test=8, R=5, D=16)


def _cmd(paths: DataPaths, out: Path, delay: float) -> list[str]:
    args = {"paths": paths.__dict__, "model": MODEL_CFG, "train": TRAIN_CFG, "out": str(out), "delay": delay}
    return [sys.executable, "-c", RUNNER, json.dumps(args)]


def _run(paths: DataPaths, out: Path, delay: float = 0.0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(_cmd(paths, out, delay), check=True, capture_output=True, timeout=300)


def _log_rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


def _interrupt(paths: DataPaths, out: Path, sig: int, wait_steps: int) -> None:
    """Start (or resume) training, send ``sig`` once the saved state has reached ``wait_steps``."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(_cmd(paths, out, 0.05), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / ".state.pt"
    t0 = time.time()
    while time.time() - t0 < 120:
        if state.exists():
            try:
                if torch.load(state, weights_only=True)["loop"]["step"] >= wait_steps:
                    break
            except Exception:  # noqa: BLE001 (being replaced right now)
                pass
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not (out / "model.pt").exists(), "training finished before it could be interrupted"
    assert state.exists()


def test_resume_after_kill_is_exact(corpus_paths, tmp_path):
    """Also the README's reproducibility promise: a second uninterrupted run in a new process, same seed, threads
    and libraries, gives bit-identical weights, log and metrics ("again")."""
    _run(corpus_paths, tmp_path / "full")
    _run(corpus_paths, tmp_path / "again")
    # SIGKILL after step 5, resume, SIGTERM after step 13 (saves at the end of the step), resume to the end
    _interrupt(corpus_paths, tmp_path / "killed", signal.SIGKILL, wait_steps=5)
    _interrupt(corpus_paths, tmp_path / "killed", signal.SIGTERM, wait_steps=13)
    _run(corpus_paths, tmp_path / "killed")
    ref = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["parts"][0]
    corpus = Corpus(corpus_paths, frozenset({"blocks"}))
    ref_metrics = evaluate_checkpoint(str(tmp_path / "full" / "model.pt"), corpus)[0]
    for name in ("killed", "again"):
        got = torch.load(tmp_path / name / "model.pt", weights_only=True)["parts"][0]
        assert (got["epoch"], got["step"], got["val_rsum"]) == (ref["epoch"], ref["step"], ref["val_rsum"])
        for k, v in ref["state_dict"].items():
            assert torch.equal(v, got["state_dict"][k]), k
        assert _log_rows(tmp_path / name / "log.csv") == _log_rows(tmp_path / "full" / "log.csv")
        assert evaluate_checkpoint(str(tmp_path / name / "model.pt"), corpus)[0] == ref_metrics
        assert not (tmp_path / name / ".state.pt").exists()
    rows = _log_rows(tmp_path / "full" / "log.csv")
    # validations: every 7 steps inside an epoch + each epoch end (3 epochs × 10 steps)
    assert [int(r["step"]) for r in rows] == [7, 10, 14, 20, 21, 28, 30]
    assert float(rows[-1]["lr"]) == pytest.approx(2e-4)  # decayed after 2 epochs
    assert float(rows[-1]["rsum"]) > float(rows[0]["rsum"])  # it learns


def test_stale_state_is_ignored(corpus_paths, tmp_path):
    from itmatch.training.loop import train_model

    out = tmp_path / "o"
    out.mkdir()
    torch.save({"key": "other settings"}, out / ".state.pt")
    corpus = Corpus(corpus_paths, frozenset({"blocks"}))
    best = train_model("pfan", MODEL_CFG, {**TRAIN_CFG, "epochs": 1, "val_every_steps": 0}, corpus,
                       out / "model.pt", out / "log.csv", out / ".state.pt")
    assert best["step"] == 10 and (out / "model.pt").exists() and not (out / ".state.pt").exists()


def test_max_steps_per_epoch_caps_each_epoch(corpus_paths, tmp_path):
    """training.max_steps_per_epoch: each epoch stops after its first N batches (then validates)."""
    from itmatch.training.loop import train_model

    corpus = Corpus(corpus_paths, frozenset({"blocks"}))
    cfg = {**TRAIN_CFG, "epochs": 2, "val_every_steps": 0, "max_steps_per_epoch": 3}
    train_model("pfan", MODEL_CFG, cfg, corpus, tmp_path / "model.pt", tmp_path / "log.csv", tmp_path / ".state.pt")
    with open(tmp_path / "log.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(int(r["epoch"]), int(r["step"])) for r in rows] == [(0, 3), (1, 6)]  # 10 batches an epoch uncapped
