"""SMFEA and GLFN through the shared training loop and evaluation, on a synthetic corpus extended with
the text stage's formats (trees.parquet + tree_vocab.json, concepts.h5, bert.h5, tags.h5)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from itmatch.corpus.data import Corpus, DataPaths
from itmatch.corpus.synthetic import write_synthetic_corpus
from itmatch.evaluation.evaluate import evaluate_checkpoint
from itmatch.text.concepts import build_concepts, write_concepts
from itmatch.training.loop import train_model


def _extend(paths: DataPaths, root: Path, H: int = 16) -> DataPaths:
    rng = np.random.default_rng(0)
    caps = pq.read_table(paths.captions).to_pandas()
    toks = pq.read_table(paths.tokens).column("tokens").to_pylist()
    # referral trees: leaves from the caption's words, relations arbitrary, some nulls
    labels = []
    for t in toks:
        lab = [-1] * 7
        for k, node in enumerate((0, 2, 4, 6)):
            if k < len(t):
                lab[node] = int(t[k]) % 6
        lab[1] = int(t[0]) % 3
        labels.append(lab)
    pq.write_table(pa.table({"caption_id": pa.array(caps["caption_id"], pa.int64()),
                             "labels": pa.array(labels, pa.list_(pa.int32()))}), root / "trees.parquet")
    (root / "tree_vocab.json").write_text(json.dumps({"entities": [f"e{i}" for i in range(6)],
                                                      "relations": ["r0", "r1", "r2"]}), encoding="utf-8")
    # BERT: one fixed random vector per word id plus noise, ragged
    protos = rng.standard_normal((200, H)).astype(np.float32)
    lengths = [len(t) for t in toks]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate([protos[np.array(t)] + 0.1 * rng.standard_normal((len(t), H)) for t in toks])
    with h5py.File(root / "bert.h5", "w") as f:
        f.create_dataset("values", data=values.astype(np.float16))
        f.create_dataset("offsets", data=offsets)
        f.create_dataset("caption_id", data=caps["caption_id"].to_numpy())
    with h5py.File(paths.regions, "r") as f:
        N, R, _ = f["features"].shape
        nreg = f["num_regions"][:]
    index = rng.integers(0, 5, (N, R)).astype(np.int32)
    index[np.arange(R)[None, :] >= nreg[:, None]] = -1
    with h5py.File(root / "tags.h5", "w") as f:
        f.create_dataset("vectors", data=rng.standard_normal((5, H)).astype(np.float16))
        f.create_dataset("index", data=index)
    paths.trees, paths.bert, paths.tags = str(root / "trees.parquet"), str(root / "bert.h5"), str(root / "tags.h5")
    # concepts (SMFEA's CAC): every caption word ("w14") a noun, its lemma in letters ("wbe"); all of them kept
    tagged = [[("NN", "w" + "".join(chr(97 + int(d)) for d in w[1:])) for w in text.split()] for text in caps["text"]]
    train = caps["split"].to_numpy() == "train"
    built = build_concepts(tagged, train, {"num_concepts": 30, "pos_shares": {"noun": 1.0}})
    assert len(built["names"]) == len({w for t, tr in zip(tagged, train, strict=True) if tr for _, w in t})
    write_concepts(root / "concepts.h5", caps["caption_id"].to_numpy(), built, "test")
    paths.concepts = str(root / "concepts.h5")
    return paths


@pytest.fixture(scope="module")
def corpus_paths(tmp_path_factory) -> DataPaths:
    root = tmp_path_factory.mktemp("synthetic")
    return _extend(write_synthetic_corpus(root, n_train=40, n_val=10, n_test=10), root)


@pytest.mark.parametrize("name,cfg", [
    ("smfea", {"embed_dim": 16, "word_dim": 8, "node_input_dim": 8, "hidden_dim": 8}),
    ("glfn", {"embed_dim": 16, "block_dim": 8, "word_dim": 8}),
])
def test_train_two_epochs_then_evaluate(tmp_path, corpus_paths, name, cfg):
    from itmatch.models.registry import model_class

    corpus = Corpus(corpus_paths, model_class(name).inputs(cfg))
    if name == "smfea":
        assert (corpus.info["n_entities"], corpus.info["n_relations"]) == (6, 3) and corpus.info["n_concepts"] > 2
    torch.manual_seed(0)
    best = train_model(name, cfg, {"num_workers": 0, "device": "cpu", "precision": "fp32",
                                   "epochs": 2, "batch_size": 16, "lr": 1e-3,
                                         "val_max_images": 10}, corpus,
                       tmp_path / "model.pt", tmp_path / "log.csv", tmp_path / "state.pt")
    assert best["val_rsum"] > 0 and not (tmp_path / "state.pt").exists()
    prot, n_img, n_cap = evaluate_checkpoint(str(tmp_path / "model.pt"), corpus, split="test")
    assert (n_img, n_cap) == (10, 50)
    assert 0 <= prot["1k"]["rsum"] <= 600
