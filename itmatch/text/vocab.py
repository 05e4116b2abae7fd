"""Vocabulary and token ids (SCAN-style): ``vocab.json`` and ``tokens.parquet``.

* Words: :func:`itmatch.text.tokenize.tokenize` (lowercase, nltk Treebank tokenizer).
* Vocabulary: the words of the **train** split occurring at least ``min_count`` times (default 4, as
  SCAN), sorted by decreasing count then alphabetically, after the specials
  ``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3.
* ``tokens.parquet``: ``caption_id`` (int64) and ``tokens`` (list<int32>), one row per caption, in
  the row order of ``captions.parquet``. The lists hold the caption's **words only** (no ``<start>``/
  ``<end>``: a model that wants them adds 1 and 2 around the list), so row ``i`` has exactly as many
  ids as ``bert.h5`` has vectors for caption ``i``. Words outside the vocabulary are ``<unk>`` (3).
* ``vocab.json``: ``{"idx2word": [...], "specials": {...}, "min_count": k, "counts": {word: n}}``
  (train counts of the kept words).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path

import numpy as np
import pyarrow as pa

from itmatch.text.captions import read_captions
from itmatch.text.tokenize import tokenize_all
from itmatch.utils.io import write_json, write_parquet
from itmatch.utils.logs import log

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
UNK_ID = SPECIALS.index(UNK)   # 3: the id of every word outside the vocabulary


@dataclass
class Vocab:
    idx2word: list[str]
    min_count: int = 4
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.word2idx = {w: i for i, w in enumerate(self.idx2word)}
        if tuple(self.idx2word[:4]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {self.idx2word[:4]}")

    def __len__(self) -> int:
        return len(self.idx2word)

    def encode(self, words: Sequence[str]) -> list[int]:
        get = self.word2idx.get
        return [get(w, UNK_ID) for w in words]

    def decode(self, ids: Sequence[int]) -> list[str]:
        return [self.idx2word[int(i)] for i in ids]

    def to_json(self) -> dict:
        return {"idx2word": self.idx2word, "specials": {w: i for i, w in enumerate(SPECIALS)},
                "min_count": self.min_count, "counts": self.counts}

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
        try:
            return cls(d["idx2word"], int(d.get("min_count", 0)), d.get("counts", {}))
        except KeyError as e:
            raise ValueError(f"{path}: not a vocabulary file (missing {e})") from e


def build_vocab(train_tokens: Sequence[Sequence[str]], min_count: int = 4) -> Vocab:
    """Words with at least ``min_count`` train occurrences, most frequent first, after the specials."""
    counts: Counter[str] = Counter(chain.from_iterable(train_tokens))
    for s in SPECIALS:
        counts.pop(s, None)
    kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return Vocab([*SPECIALS, *kept], min_count, {w: counts[w] for w in kept})


def encode_table(caption_ids: np.ndarray, tokens: Sequence[Sequence[str]], vocab: Vocab) -> pa.Table:
    """``tokens.parquet`` as an Arrow table: caption_id + list<int32> of word ids."""
    lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    offsets = np.zeros(len(tokens) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    get = vocab.word2idx.get
    flat = np.fromiter(map(get, chain.from_iterable(tokens), repeat(UNK_ID)), dtype=np.int32, count=int(offsets[-1]))
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int32()))
    return pa.table({"caption_id": pa.array(np.asarray(caption_ids, dtype=np.int64)), "tokens": lists})


def make_tokens(captions_path: str | Path, vocab_out: str | Path, tokens_out: str | Path,
                min_count: int = 4) -> Vocab:
    """Rule ``tokenize``: captions.parquet → vocab.json + tokens.parquet."""
    caps = read_captions(captions_path)
    tokens = tokenize_all(caps["text"].tolist())
    train = caps["split"].to_numpy() == "train"
    if not train.any():
        raise ValueError(f"{captions_path}: no train captions to build the vocabulary from")
    vocab = build_vocab([t for t, keep in zip(tokens, train, strict=True) if keep], min_count)
    table = encode_table(caps["caption_id"].to_numpy(), tokens, vocab)
    n_tok = sum(len(t) for t in tokens)
    n_unk = int(np.sum(np.asarray(table.column("tokens").combine_chunks().flatten()) == UNK_ID))
    log.info("tokens: %d captions, %d tokens, vocabulary %d (min count %d), <unk> rate %.3f%%",
             len(caps), n_tok, len(vocab), min_count, 100 * n_unk / max(n_tok, 1))
    write_json(vocab_out, vocab.to_json(), indent=None)
    write_parquet(tokens_out, table)
    return vocab
