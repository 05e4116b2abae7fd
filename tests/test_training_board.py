"""TensorBoard events of a training run (itmatch.training.board): the scalars are there, match the CSV, and a
resumed run leaves one event per step."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from itmatch.corpus.data import Corpus
from itmatch.corpus.synthetic import write_synthetic_corpus
from itmatch.training.board import VAL_KEYS
from itmatch.training.loop import train_model

MODEL_CFG = {"embed_dim": 16, "word_dim": 8, "block_dim": 4, "direction": "t2i"}
TRAIN_CFG = {"num_workers": 0, "device": "cpu", "precision": "fp32", "epochs": 2, "batch_size": 8, "lr": 2e-3,
             "lr_decay": 0.1, "lr_decay_epochs": 1, "val_max_images": 8, "checkpoint_every_steps": 0,
             "val_every_steps": 3, "threads": 1, "seed": 5}
STEPS = 2 * 10  # 16 train images × 5 captions / batch 8, two epochs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    paths = write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), n_train=16, n_val=8, n_test=8, R=5, D=16)
    return Corpus(paths, frozenset({"blocks"}))


def _train(corpus: Corpus, out: Path, **kw) -> None:
    train_model("pfan", MODEL_CFG, TRAIN_CFG, corpus, out / "model.pt", out / "train_log.csv", out / ".state.pt",
                **kw)


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_events_beside_the_csv(tmp_path, corpus):
    out = tmp_path / "run"
    _train(corpus, out)
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    s = _scalars(out)
    assert set(s) == {"train/loss", "train/lr", "train/step_seconds", *(f"val/{k}" for k in VAL_KEYS)}
    assert [step for step, _ in s["train/loss"]] == list(range(1, STEPS + 1))
    assert [v for _, v in s["train/lr"]] == pytest.approx([2e-3] * 10 + [2e-4] * 10)
    assert all(v > 0 for _, v in s["train/step_seconds"])
    rows = _csv(out / "train_log.csv")
    for k in VAL_KEYS:  # one point per CSV row, same step, same value (float32 in the event file)
        assert [(int(r["step"]), float(r[k])) for r in rows] == [
            (step, pytest.approx(v, rel=1e-6, abs=1e-4)) for step, v in s[f"val/{k}"]]
    # a fresh run in the same folder replaces the earlier events
    (out / "model.pt").unlink()
    _train(corpus, out)
    assert len(list(out.glob("events.out.tfevents.*"))) == 1


def test_resumed_run_has_one_event_per_step(tmp_path, corpus):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="stopped at step 7"):
        _train(corpus, out, stop_after_steps=7)
    # what a killed process may leave: events past the saved state (here: steps 8, 9 written by hand)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out)) as w:
        for step in (8, 9):
            w.add_scalar("train/loss", 123.0, step)
    _train(corpus, out)
    s = _scalars(out)
    assert [step for step, _ in s["train/loss"]] == list(range(1, STEPS + 1))
    assert 123.0 not in [v for _, v in s["train/loss"]]
    rows = _csv(out / "train_log.csv")
    assert [step for step, _ in s["val/rsum"]] == [int(r["step"]) for r in rows]
