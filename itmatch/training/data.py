"""Data loading for training and evaluation, in the batch layout of :mod:`itmatch.models.base`.

Memory does not grow with the number of images: HDF5 files (regions.h5, blocks.h5, tags.h5, bert.h5)
are opened lazily in each process (DataLoader workers included) and read one image / caption at a
time (regions.h5 stores one image per chunk). What is held in memory is per caption and small: the
token ids (one flat int32 array + offsets), the caption → image row map, split labels.

Inputs (see the artifact contract): images.parquet (row order = regions.h5 rows), captions.parquet,
tokens.parquet (same row order as captions.parquet), vocab.json, and the optional blocks.h5, tags.h5,
bert.h5, trees.parquet named by the model's inputs (:func:`itmatch.models.registry.model_inputs`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

Batch = dict[str, torch.Tensor]


@dataclass
class DataPaths:
    images: str
    captions: str
    tokens: str
    vocab: str
    regions: str
    blocks: str | None = None
    tags: str | None = None
    bert: str | None = None
    trees: str | None = None

    @classmethod
    def from_inputs(cls, inputs: Any) -> DataPaths:
        """From a rule's named inputs (Snakemake's ``input``): the fields it names, others None."""
        return cls(**{f.name: getattr(inputs, f.name) for f in fields(cls) if hasattr(inputs, f.name)})


class LazyH5:
    """An HDF5 file opened on first use in the current process (safe across DataLoader worker forks)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._f: h5py.File | None = None
        self._pid = -1

    def file(self) -> h5py.File:
        if self._f is None or self._pid != os.getpid():
            self._f = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._f

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_f": None, "_pid": -1}


def _read_column(path: str, columns: list[str]) -> dict[str, np.ndarray]:
    table = pq.read_table(path, columns=columns)
    return {c: table.column(c).to_numpy() for c in columns}


def _ragged(path: str, column: str, key_column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list column as (flat values, offsets [n+1], keys)."""
    table = pq.read_table(path, columns=[key_column, column])
    if column not in table.column_names:
        raise KeyError(f"{path}: column {column!r} missing")
    arr = table.column(column).combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)
    offsets = offsets - offsets[0]
    return values[: offsets[-1]], offsets, table.column(key_column).to_numpy()


@dataclass(frozen=True)
class TextOptions:
    """Caption tokenisation of one model (config ``models.<model>.tokens``): ``start_end`` wraps every
    caption in ``<start>`` / ``<end>`` (ids 1 and 2 of vocab.json, as SCAN's data loader does); ``max_words``
    keeps the first words of longer captions (BSSAN: 30), before the wrapping."""

    start_end: bool
    max_words: int | None

    @classmethod
    def from_config(cls, model_cfg: dict[str, Any]) -> TextOptions:
        """From a model's resolved settings; without a ``tokens`` block, captions are used as stored."""
        t = model_cfg.get("tokens") or {}
        max_words = t.get("max_words")
        if max_words is not None and int(max_words) < 1:
            raise ValueError(f"models.<model>.tokens.max_words must be >= 1 or null, got {max_words!r}")
        return cls(bool(t.get("start_end", False)), None if max_words is None else int(max_words))


START_ID, END_ID = 1, 2   # vocab.json specials (itmatch.text.vocab.SPECIALS)


class Corpus:
    """Everything per caption / per image that is small, plus lazy handles to the big arrays."""

    def __init__(self, paths: DataPaths, requires: frozenset[str] = frozenset(), text: TextOptions | None = None):
        self.paths = paths
        self.text = text or TextOptions(False, None)
        if self.text.start_end and "bert" in requires:
            raise ValueError("models.<model>.tokens.start_end: true needs token ids, but this model reads BERT "
                             "vectors (bert.h5 has one vector per word, no <start>/<end>)")
        img = _read_column(paths.images, ["image_id", "split"])
        cap = _read_column(paths.captions, ["caption_id", "image_id", "split"])
        self.image_split = img["split"].astype(str)
        self.caption_split = cap["split"].astype(str)
        row_of = {int(i): r for r, i in enumerate(img["image_id"])}
        try:
            self.caption_image = np.array([row_of[int(i)] for i in cap["image_id"]], dtype=np.int64)
        except KeyError as e:
            raise ValueError(f"{paths.captions}: caption image_id {e.args[0]} is not in {paths.images}") from None
        self.tokens, self.token_offsets, tok_ids = _ragged(paths.tokens, "tokens", "caption_id")
        self.tokens = self.tokens.astype(np.int64)
        if len(tok_ids) != len(cap["caption_id"]) or not np.array_equal(tok_ids, cap["caption_id"]):
            raise ValueError(f"{paths.tokens}: caption_id column does not match {paths.captions} row by row")
        with open(paths.vocab, encoding="utf-8") as fh:
            vocab = json.load(fh)
        words = vocab.get("idx2word") if isinstance(vocab, dict) and "idx2word" in vocab else vocab
        self.vocab_size = len(words)
        if len(self.tokens) and int(self.tokens.max()) >= self.vocab_size:
            raise ValueError(f"{paths.tokens}: token id {int(self.tokens.max())} >= vocabulary size "
                             f"{self.vocab_size} ({paths.vocab})")
        self.regions = LazyH5(paths.regions)
        with h5py.File(paths.regions, "r") as f:
            for key in ("features", "num_regions", "boxes", "image_hw"):
                if key not in f:
                    raise KeyError(f"{paths.regions}: dataset {key!r} missing")
            self.n_images, self.R, self.feature_dim = f["features"].shape
            if not np.array_equal(f["image_id"][:], img["image_id"]):
                raise ValueError(f"{paths.regions}: image_id rows differ from {paths.images}")
        self.info: dict[str, Any] = {"vocab_size": self.vocab_size, "feature_dim": int(self.feature_dim),
                                     "num_regions": int(self.R)}
        self.blocks = self.tags = self.bert = None
        self.trees = None
        if "blocks" in requires:
            self.blocks = LazyH5(self._need(paths.blocks, "blocks"))
            with h5py.File(paths.blocks, "r") as f:
                self.info["blocks_K"] = int(f.attrs["K"])
                self.info["blocks_L"] = int(f.attrs["L"])
                if f["index"].shape[:2] != (self.n_images, self.R):
                    raise ValueError(f"{paths.blocks}: index shape {f['index'].shape} does not match regions "
                                     f"[{self.n_images}, {self.R}, L]")
        if "tags" in requires:
            self.tags = LazyH5(self._need(paths.tags, "tags"))
            with h5py.File(paths.tags, "r") as f:  # one vector per distinct phrase: small, kept in memory
                self.tag_table = f["vectors"][:].astype(np.float32)
                self.info["tag_dim"] = int(self.tag_table.shape[1])
        if "bert" in requires:
            self.bert = LazyH5(self._need(paths.bert, "bert"))
            with h5py.File(paths.bert, "r") as f:
                self.info["bert_dim"] = int(f["values"].shape[1])
        if "trees" in requires:
            vals, offs, ids = _ragged(self._need(paths.trees, "trees"), "labels", "caption_id")
            if not np.array_equal(ids, cap["caption_id"]) or not (np.diff(offs) == 7).all():
                raise ValueError(f"{paths.trees}: rows must match captions.parquet with 7 labels each")
            self.trees = vals.astype(np.int64).reshape(-1, 7)
            vocab_path = Path(paths.trees).with_name("tree_vocab.json")
            if vocab_path.exists():
                tv = json.loads(vocab_path.read_text(encoding="utf-8"))
                self.info["n_entities"] = len(tv["entities"])
                self.info["n_relations"] = len(tv["relations"])

    @staticmethod
    def _need(path: str | None, what: str) -> str:
        if not path:
            raise ValueError(f"the model needs {what} input but no path was given")
        return path

    def rows(self, split: str, what: str) -> np.ndarray:
        labels = self.image_split if what == "images" else self.caption_split
        return np.flatnonzero(labels == split)

    # ---- items ----
    def image_item(self, row: int) -> dict[str, np.ndarray]:
        f = self.regions.file()
        item = {"features": f["features"][row].astype(np.float32), "num_regions": int(f["num_regions"][row]),
                "boxes": f["boxes"][row].astype(np.float32), "image_hw": f["image_hw"][row].astype(np.int64),
                "index": row}
        for key, dtype in (("object_id", np.int64), ("attribute_id", np.int64), ("object_conf", np.float32)):
            if key in f:
                item[key] = f[key][row].astype(dtype)
        if self.blocks is not None:
            b = self.blocks.file()
            item["block_index"] = b["index"][row].astype(np.int64)
            item["block_weight"] = b["weight"][row].astype(np.float32)
        if self.tags is not None:
            t = self.tags.file()
            idx = t["index"][row]
            vec = self.tag_table[np.clip(idx, 0, None)]  # fancy indexing copies
            vec[idx < 0] = 0
            item["tag_vectors"] = vec
        return item

    def caption_item(self, row: int) -> dict[str, Any]:
        s, e = self.token_offsets[row], self.token_offsets[row + 1]
        toks = self.tokens[s:e]
        if len(toks) == 0:
            toks = np.array([3], dtype=np.int64)  # an empty caption reads as one <unk>
        max_words = self.text.max_words
        if max_words is not None:
            toks = toks[:max_words]
        if self.text.start_end:
            toks = np.concatenate([[START_ID], toks, [END_ID]]).astype(np.int64)
        item: dict[str, Any] = {"tokens": toks, "index": row, "image_index": int(self.caption_image[row])}
        if self.bert is not None:
            b = self.bert.file()
            o = b["offsets"]
            bs, be = int(o[row]), int(o[row + 1])
            vec = b["values"][bs:be].astype(np.float32) if be > bs else np.zeros((1, b["values"].shape[1]),
                                                                                   np.float32)
            item["bert"] = vec if max_words is None else vec[:max_words]
        if self.trees is not None:
            item["tree_labels"] = self.trees[row]
        return item


def collate_images(items: list[dict[str, Any]]) -> Batch:
    out: Batch = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        out[key] = torch.as_tensor(np.stack(vals)) if isinstance(vals[0], np.ndarray) else torch.tensor(vals)
    return out


def collate_captions(items: list[dict[str, Any]]) -> Batch:
    lengths = [len(it["tokens"]) for it in items]
    W = max(lengths)
    toks = np.zeros((len(items), W), dtype=np.int64)
    for i, it in enumerate(items):
        toks[i, : lengths[i]] = it["tokens"]
    out: Batch = {"tokens": torch.from_numpy(toks), "lengths": torch.tensor(lengths, dtype=torch.int64),
                  "image_index": torch.tensor([it["image_index"] for it in items], dtype=torch.int64),
                  "index": torch.tensor([it["index"] for it in items], dtype=torch.int64)}
    if "bert" in items[0]:
        H = items[0]["bert"].shape[1]
        bert = np.zeros((len(items), W, H), dtype=np.float32)
        for i, it in enumerate(items):
            n = min(len(it["bert"]), W)
            bert[i, :n] = it["bert"][:n]
        out["bert"] = torch.from_numpy(bert)
    if "tree_labels" in items[0]:
        out["tree_labels"] = torch.as_tensor(np.stack([it["tree_labels"] for it in items]))
    return out


class PairDataset(Dataset):
    """Training pairs: item k = (image of caption rows[k], caption rows[k])."""

    def __init__(self, corpus: Corpus, caption_rows: np.ndarray):
        self.corpus = corpus
        self.rows = caption_rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[dict[str, Any], dict[str, Any]]:
        c = int(self.rows[k])
        return self.corpus.image_item(int(self.corpus.caption_image[c])), self.corpus.caption_item(c)


def collate_pairs(items: list[tuple[dict, dict]]) -> tuple[Batch, Batch]:
    return collate_images([a for a, _ in items]), collate_captions([b for _, b in items])


class RowDataset(Dataset):
    """Images or captions by row (evaluation)."""

    def __init__(self, corpus: Corpus, rows: np.ndarray, what: str):
        self.corpus, self.rows, self.what = corpus, rows, what

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> dict[str, Any]:
        r = int(self.rows[k])
        return self.corpus.image_item(r) if self.what == "images" else self.corpus.caption_item(r)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The deterministic batch order of one epoch (a permutation from seed and epoch)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[s:s + batch_size] for s in range(0, n, batch_size)]


def loader(dataset: Dataset, batches: list[list[int]] | None = None, batch_size: int = 128,
           num_workers: int = 0, collate=None) -> DataLoader:
    kw: dict[str, Any] = {"num_workers": num_workers, "collate_fn": collate}
    if num_workers > 0:
        kw["prefetch_factor"] = 2
    if batches is not None:
        return DataLoader(dataset, batch_sampler=batches, **kw)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **kw)
