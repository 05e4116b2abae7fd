"""Vocabulary and token ids (SCAN-style): ``vocab.json`` and ``tokens.parquet``.

* Words: :func:`itmatch.text.tokenize.tokenize` (lowercase, nltk Treebank tokenizer).
* Vocabulary: the words of the **train** split occurring at least ``min_count`` times (default 4, as
  SCAN), sorted by decreasing count then alphabetically, after the specials
  ``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3. SCAN's own ``vocab.py`` (kuanghuei/SCAN,
  lines 73–100) counts the **train and dev** caption files with threshold 4 and keeps the words in the order
  its ``Counter`` yields them (first occurrence under Python 3; hash order under the Python 2 that made the
  released files): ``vocab_splits=("train", "val")`` and ``order="first"`` rebuild it (precomp datasets).
* A released SCAN-format vocabulary (``{"word2idx": {...}, "idx2word": {...}, "idx": n}``) is read by
  :func:`read_scan_vocab` and used as it is, so that token ids equal SCAN's.
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
from itmatch.text.tokenize import punkt_available, tokenize_all
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
        """Our ``vocab.json``, or a SCAN-format vocabulary (``word2idx`` + ``idx2word``)."""
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
        if isinstance(d, dict) and "word2idx" in d:
            return scan_vocab_from_dict(d, path)
        try:
            return cls(d["idx2word"], int(d.get("min_count", 0)), d.get("counts", {}))
        except KeyError as e:
            raise ValueError(f"{path}: not a vocabulary file (missing {e})") from e
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def read_scan_vocab(path: str | Path) -> Vocab:
    """A SCAN-format vocabulary JSON (SCAN ``vocab.py`` ``serialize_vocab``, lines 46–52) → :class:`Vocab` with
    the same ids; errors name the file and the key."""
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
    return scan_vocab_from_dict(d, path)


def scan_vocab_from_dict(d: object, path: str | Path) -> Vocab:
    """The checks of :func:`read_scan_vocab` on the parsed JSON."""
    if not isinstance(d, dict) or not isinstance(d.get("word2idx"), dict):
        raise ValueError(f"{path}: not a SCAN vocabulary: no 'word2idx' mapping (expected keys word2idx, idx2word)")
    w2i = d["word2idx"]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in w2i.values()):
        bad = next(w for w, i in w2i.items() if not isinstance(i, int) or isinstance(i, bool))
        raise ValueError(f"{path}: word2idx[{bad!r}] = {w2i[bad]!r} is not an integer id")
    idx2word = [""] * len(w2i)
    for w, i in w2i.items():
        if not 0 <= i < len(w2i) or idx2word[i]:
            raise ValueError(f"{path}: word2idx ids are not 0..{len(w2i) - 1} each once (word {w!r} has id {i})")
        idx2word[i] = w
    i2w = d.get("idx2word")
    if i2w is not None:
        items = i2w.items() if isinstance(i2w, dict) else enumerate(i2w)
        for i, w in items:
            if int(i) >= len(idx2word) or idx2word[int(i)] != w:
                raise ValueError(f"{path}: idx2word[{i}] = {w!r} disagrees with word2idx")
    for i, s in enumerate(SPECIALS):
        if idx2word[i] != s:
            raise ValueError(f"{path}: id {i} is {idx2word[i]!r}, SCAN's specials are "
                             f"{', '.join(f'{w} {j}' for j, w in enumerate(SPECIALS))}")
    return Vocab(idx2word, 0, {})


VOCAB_ORDERS = ("count", "first")


def build_vocab(train_tokens: Sequence[Sequence[str]], min_count: int = 4, order: str = "count") -> Vocab:
    """Words with at least ``min_count`` occurrences after the specials: ``order="count"`` most frequent first
    (ties alphabetical); ``"first"`` in order of first occurrence, as SCAN's ``vocab.py`` under Python 3 (its
    ``Counter`` keeps insertion order, line 88)."""
    if order not in VOCAB_ORDERS:
        raise ValueError(f"vocabulary order must be one of {VOCAB_ORDERS}, got {order!r}")
    counts: Counter[str] = Counter(chain.from_iterable(train_tokens))
    for s in SPECIALS:
        counts.pop(s, None)
    kept = [w for w, c in counts.items() if c >= min_count]
    if order == "count":
        kept.sort(key=lambda w: (-counts[w], w))
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
                min_count: int = 4, vocab_splits: Sequence[str] = ("train",), order: str = "count",
                vocab_file: str | Path | None = None, sentences: bool = False) -> Vocab:
    """Rule ``tokenize``: captions.parquet → vocab.json + tokens.parquet.

    The vocabulary counts the captions of ``vocab_splits`` (``order``: see :func:`build_vocab`), or is read from
    ``vocab_file`` (ours or SCAN's format). ``sentences``: SCAN's punkt tokenisation when punkt is installed
    (:func:`itmatch.text.tokenize.tokenize_all`)."""
    caps = read_captions(captions_path)
    if sentences:
        log.info("tokens: %s", "nltk word_tokenize with punkt sentences (SCAN)" if punkt_available() else
                 "punkt not installed: Treebank words of the whole caption (differs from SCAN's only on captions "
                 "with an inner sentence end; docs/precomp.md)")
    tokens = tokenize_all(caps["text"].tolist(), sentences=sentences)
    if vocab_file is not None:
        vocab = read_scan_vocab(vocab_file)
        log.info("tokens: vocabulary read from %s (%d words)", vocab_file, len(vocab))
    else:
        use = np.isin(caps["split"].to_numpy(), list(vocab_splits))
        if not use.any():
            raise ValueError(f"{captions_path}: no {' / '.join(vocab_splits)} captions to build the vocabulary from")
        vocab = build_vocab([t for t, keep in zip(tokens, use, strict=True) if keep], min_count, order)
    table = encode_table(caps["caption_id"].to_numpy(), tokens, vocab)
    n_tok = sum(len(t) for t in tokens)
    n_unk = int(np.sum(np.asarray(table.column("tokens").combine_chunks().flatten()) == UNK_ID))
    log.info("tokens: %d captions, %d tokens, vocabulary %d (%s), <unk> rate %.3f%%", len(caps), n_tok, len(vocab),
             vocab_file or f"min count {min_count} in {' + '.join(vocab_splits)}", 100 * n_unk / max(n_tok, 1))
    write_json(vocab_out, vocab.to_json(), indent=None)
    write_parquet(tokens_out, table)
    return vocab


def vocab_settings(kind: str, dataset_cfg: dict) -> dict:
    """The tokenize rule's :func:`make_tokens` keywords of a dataset of ``kind``: precomp datasets count train + val
    in first-occurrence order and tokenise as SCAN (punkt when installed; ``punkt`` is in the settings so that
    installing it reruns the rule) or read their ``vocab`` file; other kinds: {} (train split, by count)."""
    if kind != "precomp":
        return {}
    return {"vocab_splits": ["train", "val"], "order": "first", "vocab_file": dataset_cfg.get("vocab"),
            "sentences": True, "punkt": punkt_available()}
