"""CAAN and BSSAN plug into the shared training loop and evaluation (synthetic corpus, a few steps)."""

from __future__ import annotations

import json

import pytest

from itmatch.corpus.data import Corpus
from itmatch.corpus.synthetic import write_synthetic_corpus
from itmatch.evaluation.evaluate import run_evaluation
from itmatch.models.registry import model_inputs
from itmatch.training.loop import train_model

TINY = {
    "caan": {"embed_dim": 16, "word_dim": 16, "attn_dim": 8},
    "bssan": {"word_dim": 16, "w2r_hidden": 16, "w2r_mlp": [8], "o2w_hidden": 16, "o2w_mlp": [8], "num_objects": 4,
              "w2r_input": "regions"},
}


@pytest.mark.parametrize("model", ["caan", "bssan"])
def test_trains_and_evaluates_through_the_shared_loop(tmp_path, model):
    paths = write_synthetic_corpus(tmp_path / "data", n_train=24, n_val=6, n_test=6, R=6, D=16, n_words=12)
    corpus = Corpus(paths, model_inputs(model, TINY[model]))
    tcfg = {"epochs": 2, "batch_size": 12, "lr": 1e-3, "val_max_images": 6, "checkpoint_every_steps": 0,
            "num_workers": 0, "threads": 1}
    train_model(model, TINY[model], tcfg, corpus, tmp_path / "model.pt", tmp_path / "train_log.csv",
                tmp_path / ".state.pt")
    rows = (tmp_path / "train_log.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 and rows[0].startswith("epoch,step,loss")
    out = run_evaluation(model, str(tmp_path / "model.pt"), corpus, str(tmp_path / "metrics.json"),
                         {"threads": 1}, {"dataset": "synthetic"}, "test")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"] == model and metrics["n_images"] == 6 and metrics["n_captions"] == 30
    assert 0 <= out["protocols"]["1k"]["rsum"] <= 600


def test_bssan_on_grid_features_trains_and_evaluates(tmp_path):
    """BSSAN with its published W2R input: grid.h5 read per image by the data layer (one [G, C] row, image order
    of images.parquet) next to regions.h5 for O2W; training and evaluation through the shared loop."""
    import dataclasses

    import numpy as np
    import pandas as pd

    from itmatch.features.grid import GridMeta, create_grid

    paths = write_synthetic_corpus(tmp_path / "data", n_train=24, n_val=6, n_test=6, R=6, D=16, n_words=12)
    ids = pd.read_parquet(paths.images)["image_id"].to_numpy()
    meta = GridMeta("vgg19", "relu5_4", "00" * 32, 64, "stretch", 4, 8)
    rng = np.random.default_rng(0)
    grid = rng.random((len(ids), 16, 8)).astype(np.float16)
    with create_grid(tmp_path / "grid.h5", ids, meta) as f:
        f["features"][:] = grid
    paths = dataclasses.replace(paths, grid=str(tmp_path / "grid.h5"))
    cfg = {**TINY["bssan"], "w2r_input": "grid"}
    corpus = Corpus(paths, model_inputs("bssan", cfg))
    assert (corpus.info["grid_cells"], corpus.info["grid_dim"]) == (16, 8)
    assert np.array_equal(corpus.image_item(5)["grid"], grid[5])
    tcfg = {"epochs": 1, "batch_size": 12, "lr": 1e-3, "val_max_images": 6, "checkpoint_every_steps": 0,
            "num_workers": 0, "threads": 1}
    train_model("bssan", cfg, tcfg, corpus, tmp_path / "model.pt", tmp_path / "train_log.csv", tmp_path / ".s.pt")
    out = run_evaluation("bssan", str(tmp_path / "model.pt"), corpus, str(tmp_path / "metrics.json"),
                         {"threads": 1}, {"dataset": "synthetic"}, "test")
    assert 0 <= out["protocols"]["1k"]["rsum"] <= 600
    shuffled = tmp_path / "bad.h5"
    with create_grid(shuffled, ids[::-1].copy(), meta):
        pass
    with pytest.raises(ValueError, match="image_id rows differ"):
        Corpus(dataclasses.replace(paths, grid=str(shuffled)), frozenset({"grid"}))
