"""Tokenisation and vocabulary: nltk equivalence, cut-offs, <unk>, round trip through tokens.parquet."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from itmatch.text.tokenize import tokenize, tokenize_all, tokenize_reference
from itmatch.text.vocab import SPECIALS, Vocab, build_vocab, make_tokens

TRICKY = [
    "A man in a red shirt rides a bike down the street.",
    'Two dogs play with a ball on the grass, while a "child" watches.',
    '"Hello" said he.', "It's 3,36 euros... (roughly) isn't it?", "St. Mary's church.  ",
    "a b: c, d; e! 'tis gonna x--y [z] {w} <v>.", "  leading and trailing   spaces . ",
    "Don't you think so?' she asked.", "A cat;", "", "one", "U.S. flag at 5:30 p.m.",
]


@pytest.mark.parametrize("text", TRICKY)
def test_tokenize_equals_nltk(text):
    assert tokenize(text) == tokenize_reference(text)


def test_tokenize_equals_nltk_random_combinations():
    pieces = ["a", "Man", "dog.", '"x', 'y"', "'s", "can't", "3,5", "...", "(a)", "b,", ".", "'", "''", "--",
              "st.", "e.g.", "x!", "gonna", "won't", "[b]", "o'clock", ":", "c:", "cannot", "wanna.", "dog,",
              "cat.", "3.", "a1,", "zebra", "gimme,", "Ünï.", "café,", "x,y", "1,000."]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(pieces) for _ in range(rng.randint(1, 9))) for _ in range(3000)]
    assert tokenize_all(texts) == [tokenize_reference(t) for t in texts]


def test_vocab_cutoff_and_specials():
    toks = [["a", "dog"], ["a", "cat"], ["a", "dog"], ["a", "bird"]]
    v = build_vocab(toks, min_count=2)
    assert v.idx2word[:4] == list(SPECIALS)
    assert set(v.idx2word[4:]) == {"a", "dog"}
    assert v.idx2word[4] == "a"  # most frequent first
    assert all(v.counts[w] >= 2 for w in v.idx2word[4:])
    assert v.encode(["a", "cat", "zebra"]) == [v.word2idx["a"], 3, 3]
    assert v.decode(v.encode(["dog"])) == ["dog"]


def _captions(tmp_path):
    rows = []
    texts = {
        "train": ["A dog runs on the grass."] * 4 + ["A cat sleeps on a red sofa."] * 4
                 + ["The rare zebra isn't here."],
        "test": ["A purple walrus runs."] * 6,
    }
    cid = 100
    for split, ts in texts.items():
        for i, t in enumerate(ts):
            rows.append({"caption_id": cid, "image_id": i // 5, "split": split, "text": t})
            cid += 1
    path = tmp_path / "captions.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path, pd.DataFrame(rows)


def test_make_tokens_round_trip(tmp_path):
    cap_path, caps = _captions(tmp_path)
    vocab = make_tokens(cap_path, tmp_path / "vocab.json", tmp_path / "tokens.parquet", min_count=4)
    table = pq.read_table(tmp_path / "tokens.parquet")
    assert table.column_names == ["caption_id", "tokens"]
    assert table.column("caption_id").to_pylist() == caps["caption_id"].tolist()
    loaded = Vocab.load(tmp_path / "vocab.json")
    assert loaded.idx2word == vocab.idx2word
    for text, ids in zip(caps["text"], table.column("tokens").to_pylist(), strict=True):
        words = tokenize(text)
        assert len(ids) == len(words)
        assert loaded.decode(ids) == [w if w in loaded.word2idx else "<unk>" for w in words]
    assert "zebra" not in loaded.word2idx  # train count 1 < 4
    assert "walrus" not in loaded.word2idx  # frequent, but only in test
    assert loaded.word2idx["dog"] >= 4 and loaded.counts["dog"] == 4
    with open(tmp_path / "vocab.json") as fh:
        assert json.load(fh)["specials"] == {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}
    assert np.all(np.concatenate(table.column("tokens").to_pylist()) < len(loaded))


def test_make_tokens_bad_input(tmp_path):
    pd.DataFrame({"caption_id": [1], "split": ["train"], "text": ["x"]}).to_parquet(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="image_id"):
        make_tokens(tmp_path / "c.parquet", tmp_path / "v.json", tmp_path / "t.parquet")
