"""Data loading for training and evaluation, in the batch layout of :mod:`itmatch.models.base`.

Region features are never loaded whole: HDF5 files (regions.h5, blocks.h5, tags.h5, bert.h5) are opened
lazily in each process (DataLoader workers included) and read one image / caption at a time (regions.h5
stores one image per chunk, checksummed: a damaged chunk fails on read). What is held in memory is small:
per caption the token ids (one flat int32 array + offsets), the caption → image row map and split labels;
per image the small arrays of regions.h5 (num_regions, boxes, image_hw, object ids and confidences:
≈ 0.8 KB per image at 36 regions, ≈ 100 MB for COCO, shared with forked workers). Batches: float32 features
(cast from the stored float16 while collating, in shared memory inside workers), pinned when the device is CUDA.

Inputs (see the artifact contract): images.parquet (row order = regions.h5 rows), captions.parquet,
tokens.parquet (same row order as captions.parquet), vocab.json, and the optional blocks.h5, tags.h5,
bert.h5, trees.parquet, concepts.h5, grid.h5 (BSSAN's VGG-19 grid: one [G, C] row per image, read like the
region features) named by the model's inputs (:func:`itmatch.models.registry.model_inputs`). An HDF5 file that
cannot be opened or read (truncated, a chunk failing its checksum) raises
:class:`itmatch.utils.h5.ArtifactReadError` naming the file, the row and how to rebuild it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from itmatch.config import schema_defaults
from itmatch.utils.h5 import open_h5, reading

Batch = dict[str, torch.Tensor]
# per-image arrays of regions.h5 kept in memory, with the dtypes the batches use
IMAGE_META = {"num_regions": np.int64, "boxes": np.float32, "image_hw": np.int64, "object_id": np.int64,
              "attribute_id": np.int64, "object_conf": np.float32}


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
    grid: str | None = None
    concepts: str | None = None

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
        self._ds: dict[str, Any] = {}  # dataset handles and chunk readers of this process

    def file(self) -> h5py.File:
        if self._f is None or self._pid != os.getpid():
            self._f = open_h5(self.path)
            self._pid = os.getpid()
            self._ds = {}
        return self._f

    def dataset(self, name: str) -> h5py.Dataset:
        """A dataset handle, looked up once per process (a name lookup costs more than a small read)."""
        f = self.file()
        ds = self._ds.get(name)
        if ds is None:
            ds = self._ds[name] = f[name]
        return ds

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_f": None, "_pid": -1, "_ds": {}}


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
        t = {**schema_defaults("$defs.tokens"), **(model_cfg.get("tokens") or {})}
        max_words = t["max_words"]
        if max_words is not None and int(max_words) < 1:
            raise ValueError(f"models.<model>.tokens.max_words must be >= 1 or null, got {max_words!r}")
        return cls(bool(t["start_end"]), None if max_words is None else int(max_words))

    def apply(self, toks: np.ndarray) -> np.ndarray:
        """A caption's word ids as the model sees them: an empty caption reads as one ``<unk>``, then the first
        ``max_words`` words, then ``<start>`` / ``<end>`` around them when ``start_end``."""
        if len(toks) == 0:
            toks = np.array([UNK_ID], dtype=np.int64)  # an empty caption reads as one <unk>
        if self.max_words is not None:
            toks = toks[:self.max_words]
        if self.start_end:
            toks = np.concatenate([[START_ID], toks, [END_ID]]).astype(np.int64)
        return toks


START_ID, END_ID, UNK_ID = 1, 2, 3   # vocab.json specials (itmatch.text.vocab.SPECIALS)


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
        self.image_ids = img["image_id"].astype(np.int64)
        self.caption_ids = cap["caption_id"].astype(np.int64)
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
        with open_h5(paths.regions) as f:
            for key in ("features", "num_regions", "boxes", "image_hw"):
                if key not in f:
                    raise KeyError(f"{paths.regions}: dataset {key!r} missing")
            self.n_images, self.R, self.feature_dim = f["features"].shape
            # the small per-image arrays (≈ 0.8 KB per image at R=36: ≈ 100 MB for COCO) are read once and
            # shared with the workers (fork); only the features are read per item, one image = one chunk
            with reading(paths.regions, "image_id"):
                self.image_meta = {key: f[key][:] for key in IMAGE_META if key in f}
                region_ids = f["image_id"][:]
            if not np.array_equal(region_ids, img["image_id"]):
                raise ValueError(f"{paths.regions}: image_id rows differ from {paths.images}")
        self.info: dict[str, Any] = {"vocab_size": self.vocab_size, "feature_dim": int(self.feature_dim),
                                     "num_regions": int(self.R)}
        self.blocks = self.tags = self.bert = self.grid = None
        self.trees = None
        self.concept_index: np.ndarray | None = None
        if "blocks" in requires:
            self.blocks = LazyH5(self._need(paths.blocks, "blocks"))
            with open_h5(paths.blocks) as f:
                self.info["blocks_K"] = int(f.attrs["K"])
                self.info["blocks_L"] = int(f.attrs["L"])
                if f["index"].shape[:2] != (self.n_images, self.R):
                    raise ValueError(f"{paths.blocks}: index shape {f['index'].shape} does not match regions "
                                     f"[{self.n_images}, {self.R}, L]")
        if "tags" in requires:
            self.tags = LazyH5(self._need(paths.tags, "tags"))
            with open_h5(paths.tags) as f, reading(paths.tags, "vectors"):  # one per phrase: kept in memory
                self.tag_table = f["vectors"][:].astype(np.float32)
                self.info["tag_dim"] = int(self.tag_table.shape[1])
        if "bert" in requires:
            self.bert = LazyH5(self._need(paths.bert, "bert"))
            with open_h5(paths.bert) as f:
                self.info["bert_dim"] = int(f["values"].shape[1])
        if "grid" in requires:
            self.grid = LazyH5(self._need(paths.grid, "grid"))
            with open_h5(paths.grid) as f, reading(paths.grid, "image_id, features"):
                for key in ("image_id", "features"):
                    if key not in f:
                        raise KeyError(f"{paths.grid}: dataset {key!r} missing")
                if f["features"].ndim != 3 or f["features"].shape[0] != self.n_images:
                    raise ValueError(f"{paths.grid}: features shape {f['features'].shape}, expected "
                                     f"[{self.n_images}, G, C] (one row per image of {paths.images})")
                if not np.array_equal(f["image_id"][:], img["image_id"]):
                    raise ValueError(f"{paths.grid}: image_id rows differ from {paths.images}")
                self.info["grid_cells"], self.info["grid_dim"] = (int(x) for x in f["features"].shape[1:])
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
        if "concepts" in requires:
            self._load_concepts(self._need(paths.concepts, "concepts"), cap["caption_id"])

    def _load_concepts(self, path: str, caption_ids: np.ndarray) -> None:
        """concepts.h5 (itmatch.text.concepts): the graph for the model, each caption's concept ids, and per image
        the rows of its captions (for the image-level labels)."""
        with open_h5(path) as f, reading(path, "concepts"):
            self.concept_names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["names"][:]]
            self.concept_correlation = f["correlation"][:].astype(np.float32)
            ids, offsets = f["caption_id"][:], f["label_offsets"][:].astype(np.int64)
            self.concept_index = f["label_index"][:].astype(np.int64)
        K = len(self.concept_names)
        if not np.array_equal(ids, caption_ids) or len(offsets) != len(ids) + 1:
            raise ValueError(f"{path}: caption_id rows differ from {self.paths.captions}; rebuild it "
                             f"(snakemake --force {path})")
        if self.concept_correlation.shape != (K, K) or (len(self.concept_index) and
                                                       int(self.concept_index.max()) >= K):
            raise ValueError(f"{path}: correlation {self.concept_correlation.shape} or label ids do not match its "
                             f"{K} concepts")
        self.concept_offsets = offsets
        order = np.argsort(self.caption_image, kind="stable")
        self.image_caption_rows = order
        self.image_caption_offsets = np.concatenate(
            [[0], np.cumsum(np.bincount(self.caption_image, minlength=self.n_images))]).astype(np.int64)
        self.info["n_concepts"] = K

    def _concept_vector(self, rows: np.ndarray) -> np.ndarray:
        """Multi-hot float32 [K] of the concepts of the captions ``rows``."""
        out = np.zeros(self.info["n_concepts"], dtype=np.float32)
        o, idx = self.concept_offsets, self.concept_index
        for r in rows:
            out[idx[o[r]:o[r + 1]]] = 1.0
        return out

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
        # float16 as stored (one image = one chunk = one read); collate_images makes the batch float32
        with reading(self.regions.path, f"image row {row}"):
            item = {"features": self.regions.dataset("features")[row], "index": row}
        for key, value in self.image_meta.items():
            item[key] = int(value[row]) if key == "num_regions" else value[row].astype(IMAGE_META[key])
        if self.blocks is not None:
            with reading(self.blocks.path, f"image row {row}"):
                item["block_index"] = self.blocks.dataset("index")[row].astype(np.int64)
                item["block_weight"] = self.blocks.dataset("weight")[row].astype(np.float32)
        if self.grid is not None:
            with reading(self.grid.path, f"image row {row}"):   # float16 as stored, one chunk
                item["grid"] = self.grid.dataset("features")[row]
        if self.tags is not None:
            with reading(self.tags.path, f"image row {row}"):
                idx = self.tags.dataset("index")[row]
            vec = self.tag_table[np.clip(idx, 0, None)]  # fancy indexing copies
            vec[idx < 0] = 0
            item["tag_vectors"] = vec
        return item

    def caption_item(self, row: int) -> dict[str, Any]:
        s, e = self.token_offsets[row], self.token_offsets[row + 1]
        toks = self.text.apply(self.tokens[s:e])
        max_words = self.text.max_words
        item: dict[str, Any] = {"tokens": toks, "index": row, "image_index": int(self.caption_image[row])}
        if self.bert is not None:
            o, values = self.bert.dataset("offsets"), self.bert.dataset("values")
            with reading(self.bert.path, f"caption row {row}"):
                bs, be = int(o[row]), int(o[row + 1])
                vec = values[bs:be].astype(np.float32) if be > bs else np.zeros((1, values.shape[1]), np.float32)
            item["bert"] = vec if max_words is None else vec[:max_words]
        if self.trees is not None:
            item["tree_labels"] = self.trees[row]
        if self.concept_index is not None:
            img = int(self.caption_image[row])
            s_, e_ = self.image_caption_offsets[img], self.image_caption_offsets[img + 1]
            item["concept_labels"] = self._concept_vector(np.array([row]))
            item["image_concept_labels"] = self._concept_vector(self.image_caption_rows[s_:e_])
        return item


def _stack(vals: list[np.ndarray], float16: bool = False) -> torch.Tensor:
    """``np.stack(vals)`` as a tensor; float16 becomes float32 unless ``float16``. In a DataLoader worker the
    result is built in shared memory (as torch's default_collate does), so it reaches the main process without
    another copy, and each item is cast into it directly (one thread: no spin-waiting over small slices)."""
    dtype = torch.from_numpy(vals[0][:0]).dtype
    if dtype == torch.float16 and not float16:
        dtype = torch.float32
    shape = (len(vals), *vals[0].shape)
    if get_worker_info() is None:
        return torch.from_numpy(np.stack(vals)).to(dtype)
    elem = torch.empty(0, dtype=dtype)
    out = elem.new(elem._typed_storage()._new_shared(int(np.prod(shape)))).resize_(shape)
    for i, v in enumerate(vals):
        out[i].copy_(torch.from_numpy(v))
    return out


def collate_images(items: list[dict[str, Any]], float16: bool = False) -> Batch:
    """Image items → a batch. ``float16``: the features stay float16 as stored (for a CUDA device: half the
    bytes to copy, cast to float32 on the GPU by :func:`itmatch.utils.device.to_device`)."""
    out: Batch = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        out[key] = _stack(vals, float16) if isinstance(vals[0], np.ndarray) else torch.tensor(vals)
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
    for key in ("concept_labels", "image_concept_labels"):
        if key in items[0]:
            out[key] = torch.from_numpy(np.stack([it[key] for it in items]))
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


def collate_pairs(items: list[tuple[dict, dict]], float16: bool = False) -> tuple[Batch, Batch]:
    return collate_images([a for a, _ in items], float16), collate_captions([b for _, b in items])


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


class BatchList(Sampler[list[int]]):
    """A batch sampler whose batches are set before each pass, so one DataLoader (and its persistent
    workers) serves every epoch of a run: the indices are sent to the workers as each batch is requested."""

    def __init__(self, batches: list[list[int]] | None = None):
        self.batches: list[list[int]] = list(batches or [])

    def set_batches(self, batches: list[list[int]]) -> None:
        self.batches = list(batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


PREFETCH_FACTOR = 4  # batches each worker keeps ready (DataLoader prefetch)


def loader(dataset: Dataset, batches: list[list[int]] | Sampler | None = None, batch_size: int = 128,
           num_workers: int = 0, collate=None, pin_memory: bool = False, persistent: bool = False) -> DataLoader:
    """A DataLoader over ``dataset``: given ``batches`` (lists of indices, or a batch sampler such as
    :class:`BatchList`) or consecutive batches of ``batch_size``. With workers: ``PREFETCH_FACTOR`` batches
    prefetched per worker and, when ``persistent``, workers kept alive between passes. ``pin_memory`` (for
    a CUDA device) copies each batch to page-locked memory so host → GPU copies can overlap compute."""
    kw: dict[str, Any] = {"num_workers": num_workers, "collate_fn": collate, "pin_memory": pin_memory}
    if num_workers > 0:
        kw["prefetch_factor"] = PREFETCH_FACTOR
        kw["persistent_workers"] = persistent
    if batches is not None:
        return DataLoader(dataset, batch_sampler=batches, **kw)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **kw)
