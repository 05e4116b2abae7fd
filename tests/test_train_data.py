"""Data loading: batch layout of base.py, lazy per-process HDF5, DataLoader workers, settings merge, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from itmatch.corpus.data import Corpus, PairDataset, collate_pairs, epoch_batches, loader
from itmatch.corpus.synthetic import write_synthetic_corpus
from itmatch.training.settings import model_settings, part_config, training_settings


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return write_synthetic_corpus(tmp_path_factory.mktemp("c"), n_train=12, n_val=4, n_test=4, R=5, D=8)


def test_batch_layout_and_workers(paths):
    corpus = Corpus(paths, frozenset({"blocks"}))
    assert corpus.info["feature_dim"] == 8 and corpus.info["blocks_K"] == 4 and corpus.info["vocab_size"] == 34
    ds = PairDataset(corpus, corpus.rows("train", "captions"))
    assert len(ds) == 60
    assert pickle.loads(pickle.dumps(corpus.regions))._f is None  # handles reopen in each worker
    batches = epoch_batches(len(ds), 16, seed=1, epoch=0)
    assert sorted(sum(batches, [])) == list(range(60)) and batches == epoch_batches(60, 16, 1, 0)
    assert batches != epoch_batches(60, 16, 1, 1)
    got = {}
    for workers in (0, 2):
        images, caps = next(iter(loader(ds, batches, num_workers=workers, collate=collate_pairs)))
        got[workers] = (images, caps)
    images, caps = got[0]
    for k in images:
        assert torch.equal(images[k], got[2][0][k]), k
    assert images["features"].dtype == torch.float32 and images["features"].shape == (16, 5, 8)
    assert images["block_index"].dtype == torch.int64 and images["block_index"].shape == (16, 5, 3)
    assert images["num_regions"].dtype == torch.int64 and images["image_hw"].shape == (16, 2)
    assert caps["tokens"].shape[0] == 16 and caps["tokens"].shape[1] == int(caps["lengths"].max())
    assert (caps["tokens"][torch.arange(16), caps["lengths"] - 1] > 0).all()
    # caption → its image: image_index of the caption equals the index of the paired image
    assert torch.equal(caps["image_index"], images["index"])


def test_mismatched_tokens_rejected(paths, tmp_path):
    t = pq.read_table(paths.tokens)
    ids = t.column("caption_id").to_numpy()[::-1].copy()
    bad = tmp_path / "tokens.parquet"
    pq.write_table(pa.table({"caption_id": ids, "tokens": t.column("tokens")}), bad)
    with pytest.raises(ValueError, match="caption_id column does not match"):
        Corpus(type(paths)(**{**paths.__dict__, "tokens": str(bad)}))
    big = tmp_path / "tokens2.parquet"
    pq.write_table(pa.table({"caption_id": t.column("caption_id"),
                             "tokens": pa.array([[999]] * t.num_rows, pa.list_(pa.int32()))}), big)
    with pytest.raises(ValueError, match="vocabulary size"):
        Corpus(type(paths)(**{**paths.__dict__, "tokens": str(big)}))


def test_settings_merge():
    cfg = {"training": {"lr": 1.0, "epochs": 30, "datasets": {"coco": {"lr": 5.0, "epochs": 20}},
                        "models": {"pfan": {"epochs": 7, "lr": 2.0, "datasets": {"coco": {"lr": 9.0}}}}},
           "models": {"pfan": {"embed_dim": 1024, "fuse": ["t2i", "i2t"], "datasets": {"shapes": {"embed_dim": 64}}}}}
    assert training_settings(cfg, "pfan", "coco") == {"lr": 9.0, "epochs": 7}
    assert training_settings(cfg, "scan", "coco") == {"lr": 5.0, "epochs": 20}
    assert training_settings(cfg, "pfan", "f30k") == {"lr": 2.0, "epochs": 7}
    m = model_settings(cfg, "pfan", "shapes")
    assert m["embed_dim"] == 64 and "training" not in m and "datasets" not in m
    assert part_config(m, "i2t") == {"embed_dim": 64, "direction": "i2t"}
    assert np.isclose(model_settings(cfg, "pfan", "coco")["embed_dim"], 1024)


def test_data_paths_from_rule_inputs_takes_the_named_fields_only():
    from types import SimpleNamespace

    from itmatch.corpus.data import DataPaths

    inputs = SimpleNamespace(images="i.parquet", captions="c.parquet", tokens="t.parquet", vocab="v.json",
                             regions="r.h5", blocks="b.h5", tree_vocab="tv.json", checkpoint="m.pt")
    paths = DataPaths.from_inputs(inputs)
    assert paths == DataPaths("i.parquet", "c.parquet", "t.parquet", "v.json", "r.h5", blocks="b.h5")
