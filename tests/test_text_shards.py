"""Sharded text stages: referral-tree parses and BERT features over N shards give the files one job gives,
a killed shard resumes where it stopped, and every shard records its captions/s and device."""

from __future__ import annotations

import functools
import json
import sys
import types

import h5py
import numpy as np
import pandas as pd
import pytest

import itmatch.text.bert as bert_mod
import itmatch.text.trees as trees_mod
from itmatch.text.bert import bert_shard, compute_bert, gather_bert
from itmatch.text.trees import gather_trees, make_trees, parse_shard, shard_meta
from itmatch.text.vocab import make_tokens
from itmatch.utils.shards import block_shard_rows
from tests.conftest import run_snakemake
from tests.test_text_bert import MODEL, TEXTS

DICT = {"entity_min_count": 1, "relation_min_count": 1}


def test_block_shard_rows_split_whole_blocks():
    for n, block, shards in [(10, 3, 2), (300, 16, 3), (5, 2, 6), (0, 4, 2), (7, 100, 3)]:
        spans = [block_shard_rows(n, block, i, shards) for i in range(shards)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert all(a % block == 0 or a == n for a, _ in spans)
    assert block_shard_rows(10, 2, 2, 3) == (6, 10)  # 5 blocks over 3 shards: 1, 2, 2 blocks


@pytest.fixture(scope="module")
def shapes_captions(tiny_shapes, tmp_path_factory):
    from itmatch.data.ingest import IngestOptions, ingest

    d = tmp_path_factory.mktemp("caps")
    ingest(tiny_shapes / "dataset_shapes.json", tiny_shapes / "images", d / "images.parquet",
           d / "captions.parquet", IngestOptions(verify_images="header"))
    return d / "captions.parquet", tiny_shapes / "dataset_shapes.json"


def _trees_in_shards(caps, json_path, out, n, block=16, **kw):
    shards = [out / f"{i + 1}-of-{n}.parquet" for i in range(n)]
    for i, p in enumerate(shards):
        parse_shard(caps, p, i, n, parser=kw.get("parser", "gold"), json_path=json_path, block=block,
                    record_path=p.with_suffix(".json"), **{k: v for k, v in kw.items() if k != "parser"})
    gather_trees(shards[::-1], caps, out / "trees.parquet", out / "tree_vocab.json",  # (any order)
                 parser=kw.get("parser", "gold"), **DICT)
    return shards


def test_tree_shards_equal_one_job(shapes_captions, tmp_path):
    """Gold parses of ~300 shapes captions in 1, 3 and 25 shards (blocks of 16: 19 blocks, so some of the 25
    are empty): trees.parquet and tree_vocab.json byte-identical to make_trees's; a record per shard."""
    caps, js = shapes_captions
    make_trees(caps, tmp_path / "trees.parquet", tmp_path / "tree_vocab.json", parser="gold", json_path=js, **DICT)
    n_caps = len(pd.read_parquet(caps))
    for n in (1, 3, 25):
        out = tmp_path / f"n{n}"
        shards = _trees_in_shards(caps, js, out, n)
        for name in ("trees.parquet", "tree_vocab.json"):
            assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), (n, name)
        records = [json.loads(p.with_suffix(".json").read_text()) for p in shards]
        assert sum(r["captions"] for r in records) == n_caps
        assert [(r["shard"], r["n_shards"]) for r in records] == [(i + 1, n) for i in range(n)]
        assert all(r["captions_per_s"] > 0 for r in records if r["captions"])
        assert all(r["device"] == "gold parses (no model)" for r in records if r["captions"])
        assert shard_meta(shards[-1])["record"] == records[-1]  # also in the shard file
        assert not list(out.glob("*.partial"))


def test_tree_shard_resumes_after_a_kill(shapes_captions, tmp_path, monkeypatch):
    caps, js = shapes_captions
    whole = tmp_path / "whole.parquet"
    parse_shard(caps, whole, 1, 2, json_path=js, block=16)

    def die(k):
        if k == 2:
            raise KeyboardInterrupt

    out = tmp_path / "2-of-2.parquet"
    with pytest.raises(KeyboardInterrupt):
        parse_shard(caps, out, 1, 2, json_path=js, block=16, on_block=die)
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "2-of-2.parquet.partial").glob("block-*")) == \
        [f"block-00000{k}.parquet" for k in range(3)]
    parsed = []
    real = trees_mod.CaptionParser

    class Counting(real):
        def __call__(self, ids, texts):
            parsed.extend(ids)
            return super().__call__(ids, texts)

    monkeypatch.setattr(trees_mod, "CaptionParser", Counting)
    rec = parse_shard(caps, out, 1, 2, json_path=js, block=16, record_path=tmp_path / "r.json")
    start, stop = block_shard_rows(len(pd.read_parquet(caps)), 16, 1, 2)
    assert len(parsed) == stop - start - 3 * 16  # only the blocks after the three written ones
    assert rec["resumed_at"] == 48 and rec["captions"] == stop - start - 48
    assert json.loads((tmp_path / "r.json").read_text()) == rec
    assert pd.read_parquet(out).equals(pd.read_parquet(whole))
    assert not (tmp_path / "2-of-2.parquet.partial").exists()
    # a partial folder of other settings (another block size) is started over, not mixed in
    with pytest.raises(KeyboardInterrupt):
        parse_shard(caps, out, 1, 2, json_path=js, block=16, on_block=die)
    parsed.clear()
    parse_shard(caps, out, 1, 2, json_path=js, block=32)
    assert len(parsed) == len(pd.read_parquet(out))


def _stand_in_stanza(monkeypatch, tmp_path):
    """stanza with a fake pipeline (no models here): one NP of NN leaves per sentence, lemmas = lowercase."""

    class Word:
        def __init__(self, text):
            self.text, self.lemma = text, text.lower()

    class Tree:
        def __init__(self, words):
            self.words = words

        def __format__(self, spec):
            return "(ROOT (NP " + " ".join(f"(NN {w})" for w in self.words) + "))"

    class Sentence:
        def __init__(self, words):
            self.words = [Word(w) for w in words]
            self.constituency = Tree(words)

    class Document:
        def __init__(self, sentences, text=None):
            self.text, self.sentences = text, []

    class Pipeline:
        built: list[int] = []
        batches: list[int] = []

        def __init__(self, lang, dir, processors, download_method, **kw):
            Pipeline.built.append(1)

        def bulk_process(self, docs):
            Pipeline.batches.append(len(docs))
            for d in docs:
                d.sentences = [Sentence(d.text.rstrip(".").split())] if d.text else []
            return docs

    monkeypatch.setitem(sys.modules, "stanza", types.SimpleNamespace(Pipeline=Pipeline, Document=Document))
    models = tmp_path / "stanza"
    (models / "en").mkdir(parents=True)
    (models / "resources.json").write_text("{}")
    return Pipeline, models


def test_tree_shards_on_the_stanza_path(tmp_path, monkeypatch):
    """The stanza code path through the shards (a stand-in pipeline): one pipeline per shard, batches of
    stanza_batch_size from each block start — the batches of the one-job run — and the same files."""
    pipeline, models = _stand_in_stanza(monkeypatch, tmp_path)
    texts = [f"dog cat bird {i}." for i in range(11)] + [""]
    pd.DataFrame({"caption_id": np.arange(12) + 100, "image_id": np.arange(12) // 3,
                  "split": ["train"] * 9 + ["test"] * 3, "text": texts}).to_parquet(tmp_path / "c.parquet")
    kw = {"parser": "stanza", "stanza_dir": models, "stanza_batch_size": 2, "device": "cpu"}
    make_trees(tmp_path / "c.parquet", tmp_path / "trees.parquet", tmp_path / "tree_vocab.json", **kw, **DICT)
    assert pipeline.built == [1] and pipeline.batches == [2] * 6
    pipeline.built.clear()
    pipeline.batches.clear()
    out = tmp_path / "sharded"
    shards = _trees_in_shards(tmp_path / "c.parquet", None, out, 2, block=4, **kw)
    assert pipeline.built == [1, 1] and pipeline.batches == [2] * 6
    for name in ("trees.parquet", "tree_vocab.json"):
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name
    rec = json.loads(shards[0].with_suffix(".json").read_text())
    assert rec["device"].startswith("cpu (") and rec["parser"] == "stanza" and rec["captions"] == 4  # blocks 1 | 2


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    pd.DataFrame({"caption_id": np.arange(10) + 50, "image_id": np.arange(10) // 5, "split": ["train"] * 10,
                  "text": TEXTS}).to_parquet(d / "captions.parquet")
    make_tokens(d / "captions.parquet", d / "vocab.json", d / "tokens.parquet", min_count=1)
    compute_bert(d / "captions.parquet", d / "tokens.parquet", d / "bert.h5", MODEL, batch_size=2, device="cpu",
                 block=2)
    return d


def _h5(path):
    with h5py.File(path, "r") as f:
        return ({k: f[k][:] for k in f}, dict(f.attrs),
                {k: (f[k].dtype, f[k].chunks, f[k].fletcher32) for k in f})


def _bert_in_shards(d, out, n, skip=()):
    shards = [out / f"{i + 1}-of-{n}.h5" for i in range(n)]
    for i, p in enumerate(shards):
        if i not in skip:
            bert_shard(d / "captions.parquet", d / "tokens.parquet", p, i, n, MODEL, batch_size=2, device="cpu",
                       block=2, record_path=p.with_suffix(".json"))
    return shards


@pytest.fixture()
def bert_loaded_once(monkeypatch):
    """Each shard job loads its model; here one load serves them all (test time)."""
    monkeypatch.setattr(bert_mod, "load_bert", functools.cache(bert_mod.load_bert))


def test_bert_shards_equal_one_job(text_dir, tmp_path, bert_loaded_once):
    """10 captions in blocks of 2 over 1, 3 and 6 shards (one empty): bert.h5 value-identical to compute_bert's
    (values, offsets, ids, attributes, chunk layout, checksums); each shard records captions/s and its device."""
    ref = _h5(text_dir / "bert.h5")
    for n in (1, 3, 6):
        out = tmp_path / f"n{n}"
        shards = _bert_in_shards(text_dir, out, n)
        gather_bert(shards, text_dir / "captions.parquet", text_dir / "tokens.parquet", out / "bert.h5")
        got = _h5(out / "bert.h5")
        assert got[0].keys() == ref[0].keys() and all(np.array_equal(got[0][k], ref[0][k]) for k in ref[0]), n
        assert got[1] == ref[1] and got[2] == ref[2], n
        records = [json.loads(p.with_suffix(".json").read_text()) for p in shards]
        assert [r["captions"] for r in records] == {1: [10], 3: [2, 4, 4], 6: [0, 2, 2, 2, 2, 2]}[n]
        for p, r in zip(shards, records, strict=True):
            assert r["device"].startswith("cpu (") and r["model"] == MODEL
            assert (r["captions_per_s"] or 0) > 0 or r["captions"] == 0
            with h5py.File(p, "r") as f:
                assert json.loads(f.attrs["record"]) == r and f.attrs["device"] == r["device"]
                assert (f.attrs["row_start"], f.attrs["row_stop"]) == (r["row_start"], r["row_stop"])


def test_bert_shard_resumes_after_a_kill(text_dir, tmp_path, monkeypatch, bert_loaded_once):
    """Shard 2 of 2 (captions 4..9, blocks of 2) killed after its first two blocks: the re-run computes the last
    block only, and the gathered bert.h5 equals the one-job file."""
    out = tmp_path / "s"
    shards = _bert_in_shards(text_dir, out, 2, skip=(1,))
    real = bert_mod.word_features
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # blocks of 2 captions = one batch each: blocks 0 and 1 of the shard are done
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bert_mod, "word_features", dying)
    with pytest.raises(KeyboardInterrupt):
        bert_shard(text_dir / "captions.parquet", text_dir / "tokens.parquet", shards[1], 1, 2, MODEL, batch_size=2,
                   device="cpu", block=2)
    assert not shards[1].exists()
    with h5py.File(shards[1].with_name(shards[1].name + ".partial"), "r") as f:
        assert f.attrs["done_blocks"] == 2 and f.attrs["row_start"] == 4
    calls["n"] = -100
    rec = bert_shard(text_dir / "captions.parquet", text_dir / "tokens.parquet", shards[1], 1, 2, MODEL,
                     batch_size=2, device="cpu", block=2)
    assert calls["n"] == -99 and rec["resumed_at"] == 4 and rec["captions"] == 2
    gather_bert(shards, text_dir / "captions.parquet", text_dir / "tokens.parquet", out / "bert.h5")
    ref, got = _h5(text_dir / "bert.h5"), _h5(out / "bert.h5")
    assert all(np.array_equal(got[0][k], ref[0][k]) for k in ref[0]) and got[1] == ref[1]
    with pytest.raises(ValueError, match="expected to start at 0"):  # a missing shard is named
        gather_bert(shards[1:], text_dir / "captions.parquet", text_dir / "tokens.parquet", out / "b2.h5")


def test_workflow_scatters_trees_and_bert(tmp_path):
    """`--set-scatter trees=2 bert=2` on a small shapes (blocks of 16 captions): the shard jobs run, their
    captions/s records stay, the shard files (temp) go, and trees.parquet / tree_vocab.json / bert.h5 equal what
    one job makes of the same captions; a second dry run has nothing to do."""
    targets = ["results/text/shapes/trees.parquet", "results/text/shapes/bert.h5"]
    small = tmp_path / "small.yaml"  # 20 images, 100 captions: 7 blocks
    small.write_text("datasets: {shapes: {generator: {n_train: 10, n_val: 5, n_test: 5}}}\n"
                     "text: {trees: {block: 16}, bert: {block: 16}}\n", encoding="utf-8")
    run_snakemake(tmp_path, *targets, "--set-scatter", "trees=2", "bert=2", configfiles=(small,))
    text = tmp_path / "results" / "text" / "shapes"
    for stage, n in (("tree_shards", 2), ("bert_shards", 2)):
        records = sorted((text / stage).glob("*.json"))
        assert [p.stem for p in records] == [f"{i}-of-{n}" for i in range(1, n + 1)]
        assert not list((text / stage).glob("*.parquet")) and not list((text / stage).glob("*.h5"))
        for p in records:
            r = json.loads(p.read_text())
            assert r["n_shards"] == n and r["device"] and r["captions_per_s"] > 0
    log = (tmp_path / "logs" / "text" / "bert_features_shard" / "shapes.2-of-2.log").read_text()
    assert "bert shard 2/2: 52 captions in" in log and "captions/s) on cpu (" in log
    caps, toks = tmp_path / "results/data/shapes/captions.parquet", text / "tokens.parquet"
    one = tmp_path / "one"
    make_trees(caps, one / "trees.parquet", one / "tree_vocab.json", parser="gold",
               json_path=tmp_path / "resources/shapes/dataset_shapes.json", **DICT)
    for name in ("trees.parquet", "tree_vocab.json"):
        assert (text / name).read_bytes() == (one / name).read_bytes(), name
    compute_bert(caps, toks, one / "bert.h5", MODEL, batch_size=32, device="cpu", block=16)
    ref, got = _h5(one / "bert.h5"), _h5(text / "bert.h5")
    assert all(np.array_equal(got[0][k], ref[0][k]) for k in ref[0]) and got[1] == ref[1]
    again = run_snakemake(tmp_path, "-n", *targets, "--set-scatter", "trees=2", "bert=2", configfiles=(small,))
    assert "Nothing to be done" in again.stdout + again.stderr
