"""Data loading for training and evaluation, in the batch layout of :mod:`itmatch.models.base`.

Region features are never loaded whole: HDF5 files (regions.h5, blocks.h5, tags.h5, bert.h5) are opened
lazily in each process (DataLoader workers included). Datasets hand the DataLoader whole batches
(``__getitems__``): a batch's image rows are read in one pass, each image's features as one raw chunk
(regions.h5 stores one image per chunk) with the chunks' fletcher32 checksums verified in one vectorised
pass (:class:`itmatch.utils.h5.ChunkRows`: a damaged chunk still fails on read), straight into the batch.
What is held in memory is small: per caption the token ids (one flat int32 array + offsets), the caption →
image row map and split labels; per image the small arrays of regions.h5 (num_regions, boxes, image_hw,
object ids and confidences: ≈ 0.8 KB per image at 36 regions, ≈ 100 MB for COCO, shared with forked
workers). Batches: float32 features (cast from the stored float16 while collating), or float16 as stored
for a CUDA device (cast on the GPU), pinned when the device is CUDA. A DataLoader worker builds its batches
in a few reused shared-memory slots (:class:`BatchArena`) instead of fresh shared memory per batch.

Inputs (see the artifact contract): images.parquet (row order = regions.h5 rows), captions.parquet,
tokens.parquet (same row order as captions.parquet), vocab.json, and the optional blocks.h5, tags.h5,
bert.h5, trees.parquet, concepts.h5, grid.h5 (BSSAN's VGG-19 grid: one [G, C] row per image, read like the
region features) named by the model's inputs (:func:`itmatch.models.registry.model_inputs`). An HDF5 file that
cannot be opened or read (truncated, a chunk failing its checksum) raises
:class:`itmatch.utils.h5.ArtifactReadError` naming the file, the row and how to rebuild it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from itmatch.config import schema_defaults
from itmatch.utils.h5 import ChunkRows, chunk_table, open_h5, reading

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
        self.tables: dict[str, np.ndarray] = {}  # chunk tables (ChunkRows): file content, shared with forks

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

    def rows(self, name: str, what: str) -> ChunkRows:
        """A :class:`ChunkRows` reader of one dataset (``what`` names its rows in errors), made once per process."""
        self.file()
        key = f"rows:{name}"
        reader = self._ds.get(key)
        if reader is None:
            reader = self._ds[key] = ChunkRows(self.dataset(name), self.path, what, self.tables.get(name))
            if reader.raw:
                self.tables[name] = reader.table
        return reader

    def index_chunks(self, f: h5py.File, *names: str) -> None:
        """Find the chunks of datasets stored one row per chunk now (in the main process, so that forked
        workers inherit the tables instead of each walking the chunk index)."""
        for name in names:
            ds = f[name]
            if ds.chunks is not None and ds.chunks[0] == 1 and ds.shape[0] > 0:
                self.tables[name] = chunk_table(ds)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_f": None, "_pid": -1, "_ds": {}, "tables": {}}


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
            with reading(paths.regions, "chunk index of features"):
                self.regions.index_chunks(f, "features")
        self.info: dict[str, Any] = {"vocab_size": self.vocab_size, "feature_dim": int(self.feature_dim),
                                     "num_regions": int(self.R)}
        self.blocks = self.tags = self.bert = self.grid = None
        self.trees = None
        self.concept_index: np.ndarray | None = None
        if "blocks" in requires:
            self.blocks = LazyH5(self._need(paths.blocks, "blocks"))
            with open_h5(paths.blocks) as f, reading(paths.blocks, "chunk index"):
                self.blocks.index_chunks(f, "index", "weight")
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

    # ---- items and batches ----
    def image_nbytes(self) -> int:
        """Bytes of one image in a float32 batch (sizes the shared-memory slots of :class:`BatchArena`)."""
        n = self.R * self.feature_dim * 4 + 16
        n += sum(int(np.prod(v.shape[1:])) * np.dtype(IMAGE_META[k]).itemsize for k, v in self.image_meta.items())
        if self.blocks is not None:
            n += self.R * self.info["blocks_L"] * 12
        if self.grid is not None:
            n += self.info["grid_cells"] * self.info["grid_dim"] * 4
        if self.tags is not None:
            n += self.R * self.info["tag_dim"] * 4
        return n

    def image_batch(self, rows: np.ndarray, float16: bool = False, mem: BatchMemory | None = None) -> Batch:
        """Image rows → one batch: features ``[B, R, D]`` float32 (float16 as stored when ``float16``: for a CUDA
        device, cast on the GPU), read straight into the batch, one raw chunk per image with the checksums
        checked per group of rows (:class:`ChunkRows`); the per-image arrays from memory; the block / tag inputs
        when the model reads them. ``mem`` says where the tensors are built (default: this process's memory)."""
        mem = mem or BatchMemory(worker=False)
        rows = np.asarray(rows, dtype=np.int64)
        feats = mem.empty((len(rows), self.R, self.feature_dim), torch.float16 if float16 else torch.float32)
        reader = self.regions.rows("features", "image row")
        if float16 or mem.worker:
            reader.read_into(rows, feats.numpy(), _copy)  # cast group by group in a (one-thread) worker
        else:  # main process: one cast of the whole batch, so torch's threads meet once per batch
            stored = np.empty(feats.shape, np.float16)
            reader.read_into(rows, stored)
            feats.copy_(torch.from_numpy(stored))
        out: Batch = {"features": feats, "index": mem.tensor(rows)}
        for key, value in self.image_meta.items():
            out[key] = mem.tensor(value[rows], IMAGE_META[key])
        if self.blocks is not None:
            for key, name, dtype in (("block_index", "index", torch.int64), ("block_weight", "weight", torch.float32)):
                ds = self.blocks.dataset(name)
                out[key] = mem.empty((len(rows), *ds.shape[1:]), dtype)
                self.blocks.rows(name, "image row").read_into(rows, out[key].numpy())
        if self.tags is not None:
            ds = self.tags.dataset("index")
            idx = np.empty((len(rows), *ds.shape[1:]), ds.dtype)
            self.tags.rows("index", "image row").read_into(rows, idx)
            vec = self.tag_table[np.clip(idx, 0, None)]  # fancy indexing copies
            vec[idx < 0] = 0
            out["tag_vectors"] = mem.tensor(vec)
        if self.grid is not None:  # BSSAN's VGG-19 grid, float16 as stored: one chunk per image
            unique, inverse = np.unique(rows, return_inverse=True)  # h5py reads increasing, distinct rows
            with reading(self.grid.path, f"image rows {int(unique[0])}..{int(unique[-1])}"):
                grid = self.grid.dataset("features")[unique][inverse]
            out["grid"] = mem.tensor(grid, torch.float16 if float16 else torch.float32)
        return out

    def image_item(self, row: int) -> dict[str, Any]:
        """One image row as numpy arrays (features float16 as stored; ``index``, ``num_regions`` ints)."""
        item: dict[str, Any] = {k: v[0].numpy() for k, v in self.image_batch(np.array([row]), float16=True).items()}
        item["index"] = int(row)
        if "num_regions" in item:
            item["num_regions"] = int(item["num_regions"])
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


@dataclass
class ImageRows:
    """Image rows to read as one batch: what the datasets' ``__getitems__`` hand the collate functions, which
    read them straight into the batch (:meth:`Corpus.image_batch`) instead of stacking per-image items."""

    corpus: Corpus
    rows: np.ndarray


@dataclass
class PairRows:
    """A batch of training pairs from ``PairDataset.__getitems__``: the image rows and the caption items."""

    images: ImageRows
    captions: list[dict[str, Any]]


def _copy(dest: np.ndarray, values: np.ndarray) -> None:
    """``dest[...] = values``: numpy for a plain copy, torch for a cast (its float16 → float32 is ≈ 15× numpy's)."""
    if dest.dtype == values.dtype:
        np.copyto(dest, values)
    else:
        torch.from_numpy(dest).copy_(torch.from_numpy(values))


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor in fresh shared memory (as torch's default_collate builds batches inside workers)."""
    elem = torch.empty(0, dtype=dtype)
    return elem.new(elem._typed_storage()._new_shared(int(np.prod(shape)))).resize_(shape)


_ALIGN = 64


class BatchMemory:
    """Where the tensors of one batch are built. In the main process: ordinary memory. In a DataLoader worker:
    a free slot of the loader's :class:`BatchArena` when there is one (the batch then crosses to the main
    process as a few numbers per tensor, :class:`ArenaTensor`), else — no arena, every slot still held, a
    tensor that does not fit — fresh shared memory, as torch's default_collate does."""

    def __init__(self, worker: bool | None = None) -> None:
        self.worker = get_worker_info() is not None if worker is None else worker
        self.slot = _take_slot() if self.worker else None
        self.used = 0
        self.placed: dict[int, tuple[torch.Tensor, int]] = {}  # id(tensor) → (tensor, offset in the slot)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(int(x) for x in shape)
        if self.slot is not None:
            arena, slot = self.slot
            nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
            if self.used + nbytes <= arena.slot_bytes:
                offset, self.used = self.used, -(-(self.used + nbytes) // _ALIGN) * _ALIGN
                t = torch.from_numpy(arena.view(slot, offset, shape, _np_dtype(dtype)))
                self.placed[id(t)] = (t, offset)
                return t
        return _shared_empty(shape, dtype) if self.worker else torch.empty(shape, dtype=dtype)

    def tensor(self, values: np.ndarray, dtype: Any = None) -> torch.Tensor:
        """A copy of ``values`` (cast to ``dtype``, numpy or torch) in this batch's memory."""
        values = np.asarray(values)
        np_dtype = np.dtype(dtype) if dtype is not None and not isinstance(dtype, torch.dtype) else values.dtype
        tdtype = dtype if isinstance(dtype, torch.dtype) else torch.from_numpy(np.empty(0, np_dtype)).dtype
        out = self.empty(values.shape, tdtype)
        out.numpy()[...] = values
        return out

    def stack(self, vals: list[np.ndarray], float16: bool = False) -> torch.Tensor:
        """``np.stack(vals)`` as a tensor here; float16 becomes float32 unless ``float16``."""
        dtype = torch.from_numpy(vals[0][:0]).dtype
        if dtype == torch.float16 and not float16:
            dtype = torch.float32
        if not self.worker:
            return torch.from_numpy(np.stack(vals)).to(dtype)
        out = self.empty((len(vals), *vals[0].shape), dtype)
        for i, v in enumerate(vals):  # each item cast into place (one thread: no spin-waiting over small slices)
            out[i].copy_(torch.from_numpy(v))
        return out

    def export(self, batch: Any) -> Any:
        """The batch as it leaves a worker: tensors built in the arena slot become :class:`ArenaTensor`."""
        if self.slot is None:
            return batch
        arena, slot = self.slot
        if not self.placed:
            arena.release(slot)
            return batch
        lease = SlotLease(arena.key, slot)

        def swap(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and id(x) in self.placed and self.placed[id(x)][0] is x:
                return ArenaTensor(lease, self.placed[id(x)][1], tuple(x.shape), str(_np_dtype(x.dtype)))
            if isinstance(x, dict):
                return {k: swap(v) for k, v in x.items()}
            if isinstance(x, tuple | list):
                return type(x)(swap(v) for v in x)
            return x

        return swap(batch)

    def __enter__(self) -> BatchMemory:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None and self.slot is not None:  # the batch is not sent: its slot is free again
            self.slot[0].release(self.slot[1])


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def collate_images(items: list[dict[str, Any]] | ImageRows, float16: bool = False) -> Batch:
    """Image items (or :class:`ImageRows`) → a batch. ``float16``: the features stay float16 as stored (for a CUDA
    device: half the bytes to copy, cast to float32 on the GPU by :func:`itmatch.utils.device.to_device`)."""
    with BatchMemory() as mem:
        return mem.export(_collate_images(items, float16, mem))


def _collate_images(items: list[dict[str, Any]] | ImageRows, float16: bool, mem: BatchMemory) -> Batch:
    if isinstance(items, ImageRows):
        return items.corpus.image_batch(items.rows, float16, mem)
    out: Batch = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        out[key] = mem.stack(vals, float16) if isinstance(vals[0], np.ndarray) else mem.tensor(np.array(vals))
    return out


def collate_captions(items: list[dict[str, Any]]) -> Batch:
    with BatchMemory() as mem:
        return mem.export(_collate_captions(items, mem))


def _collate_captions(items: list[dict[str, Any]], mem: BatchMemory) -> Batch:
    lengths = np.array([len(it["tokens"]) for it in items], dtype=np.int64)
    W = int(lengths.max())
    tokens = mem.empty((len(items), W), torch.int64)
    toks = tokens.numpy()
    toks[...] = 0
    for i, it in enumerate(items):
        toks[i, : lengths[i]] = it["tokens"]
    out: Batch = {"tokens": tokens, "lengths": mem.tensor(lengths),
                  "image_index": mem.tensor(np.array([it["image_index"] for it in items], dtype=np.int64)),
                  "index": mem.tensor(np.array([it["index"] for it in items], dtype=np.int64))}
    if "bert" in items[0]:
        H = items[0]["bert"].shape[1]
        out["bert"] = mem.empty((len(items), W, H), torch.float32)
        bert = out["bert"].numpy()
        bert[...] = 0
        for i, it in enumerate(items):
            n = min(len(it["bert"]), W)
            bert[i, :n] = it["bert"][:n]
    if "tree_labels" in items[0]:
        out["tree_labels"] = mem.tensor(np.stack([it["tree_labels"] for it in items]))
    for key in ("concept_labels", "image_concept_labels"):
        if key in items[0]:
            out[key] = mem.tensor(np.stack([it[key] for it in items]))
    return out


CAPTION_NBYTES = 64 * 8 + 64  # a caption in a batch, for sizing arena slots (longer ones fall back)


class PairDataset(Dataset):
    """Training pairs: item k = (image of caption rows[k], caption rows[k]); ``__getitems__`` gives a whole
    batch in the same order, read as one (:class:`PairRows`)."""

    def __init__(self, corpus: Corpus, caption_rows: np.ndarray):
        self.corpus = corpus
        self.rows = caption_rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[dict[str, Any], dict[str, Any]]:
        c = int(self.rows[k])
        return self.corpus.image_item(int(self.corpus.caption_image[c])), self.corpus.caption_item(c)

    def __getitems__(self, ks: list[int]) -> PairRows:
        caps = self.rows[np.asarray(ks, dtype=np.int64)]
        return PairRows(ImageRows(self.corpus, self.corpus.caption_image[caps]),
                        [self.corpus.caption_item(int(c)) for c in caps])

    def sample_nbytes(self) -> int:
        """Bytes of one pair in a float32 batch (sizes :class:`BatchArena` slots)."""
        n = self.corpus.image_nbytes() + CAPTION_NBYTES
        if self.corpus.bert is not None:
            n += 64 * self.corpus.info["bert_dim"] * 4
        return n


def collate_pairs(items: list[tuple[dict, dict]] | PairRows, float16: bool = False) -> tuple[Batch, Batch]:
    with BatchMemory() as mem:
        if isinstance(items, PairRows):
            pair = (_collate_images(items.images, float16, mem), _collate_captions(items.captions, mem))
        else:
            pair = (_collate_images([a for a, _ in items], float16, mem),
                    _collate_captions([b for _, b in items], mem))
        return mem.export(pair)


class RowDataset(Dataset):
    """Images or captions by row (evaluation); image batches are read as one (:class:`ImageRows`)."""

    def __init__(self, corpus: Corpus, rows: np.ndarray, what: str):
        self.corpus, self.rows, self.what = corpus, rows, what

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> dict[str, Any]:
        r = int(self.rows[k])
        return self.corpus.image_item(r) if self.what == "images" else self.corpus.caption_item(r)

    def __getitems__(self, ks: list[int]) -> ImageRows | list[dict[str, Any]]:
        rows = np.asarray(self.rows)[np.asarray(ks, dtype=np.int64)]
        if self.what == "images":
            return ImageRows(self.corpus, rows)
        return [self.corpus.caption_item(int(r)) for r in rows]

    def sample_nbytes(self) -> int:
        """Bytes of one image in a float32 batch; 0 for captions (their batches use fresh shared memory)."""
        return self.corpus.image_nbytes() if self.what == "images" else 0


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
ARENA_SPARE_SLOTS = 2  # arena slots per worker beyond its prefetched batches (the batch in use, the pinning one)


class BatchArena:
    """Reused shared memory for the batches DataLoader workers send to the main process.

    torch sends a batch built in a worker through fresh shared memory: every batch's pages are new to the
    kernel, and filling them costs page faults — on the VM these numbers were measured on, ≈ 20 ms of CPU per
    float16 batch of 128 × 36 × 2048 (its 19 MB), more than reading and checking the features themselves. An
    arena is one shared anonymous mapping made before the workers fork, cut into ``slots`` slots of
    ``slot_bytes`` per worker. A worker builds a batch in a free slot of its own (:class:`BatchMemory`) and
    sends only offsets (:class:`ArenaTensor`); the main process maps the same pages, so a batch crosses without
    a copy. A slot is free again when the main process holds no tensor of its batch any more (the last
    reference to its :class:`SlotLease` goes: the batch was used, pinned, or dropped), signalled through one
    semaphore per slot. When no slot is free the worker builds that batch in fresh shared memory as before, so
    batches kept for longer (``list(loader)``) never wait. Needs ``fork`` workers (Linux's default up to
    Python 3.13); with another start method the workers find no arena and build batches as torch does.
    """

    def __init__(self, key: int, workers: int, slots: int, slot_bytes: int):
        import mmap
        import multiprocessing

        self.key, self.workers, self.slots = key, workers, slots
        self.slot_bytes = -(-int(slot_bytes) // 4096) * 4096
        self.mm = mmap.mmap(-1, workers * slots * self.slot_bytes)  # MAP_SHARED | MAP_ANONYMOUS
        self.base = np.frombuffer(self.mm, np.uint8).ctypes.data
        self.free = [multiprocessing.BoundedSemaphore(1) for _ in range(workers * slots)]
        _ARENAS[key] = self

    def view(self, slot: int, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.ndarray(shape, dtype, buffer=self.mm, offset=slot * self.slot_bytes + offset)

    def address(self, slot: int) -> int:
        return self.base + slot * self.slot_bytes

    def take(self, worker: int) -> int | None:
        """A free slot of ``worker`` (now held), or None."""
        for slot in range(worker * self.slots, (worker + 1) * self.slots):
            if self.free[slot].acquire(block=False):
                return slot
        return None

    def release(self, slot: int) -> None:
        with contextlib.suppress(ValueError):  # released already
            self.free[slot].release()


_ARENAS: weakref.WeakValueDictionary[int, BatchArena] = weakref.WeakValueDictionary()
_ARENA_KEYS = itertools.count(1)
_WORKER_ARENA: dict[str, Any] = {}  # in a worker process: {"arena": BatchArena, "worker": id}


def _init_worker(key: int, user_init: Any, worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: find the loader's arena (inherited through fork) for this worker."""
    arena = _ARENAS.get(key)
    _WORKER_ARENA.clear()
    if arena is not None:
        _WORKER_ARENA.update(arena=arena, worker=worker_id)
    if user_init is not None:
        user_init(worker_id)


def _take_slot() -> tuple[BatchArena, int] | None:
    arena = _WORKER_ARENA.get("arena")
    if arena is None:
        return None
    slot = arena.take(_WORKER_ARENA["worker"])
    return None if slot is None else (arena, slot)


class SlotLease:
    """One arena slot held by the batch built in it. The copy that arrives in the main process gives the slot
    back when it is garbage (every :class:`ArenaTensor` of the batch, and every tensor made from them, gone)."""

    def __init__(self, key: int, slot: int):
        self.key, self.slot, self.arena = key, slot, None  # arena: set on the receiving side only

    def __getstate__(self) -> dict[str, int]:
        return {"key": self.key, "slot": self.slot}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.key, self.slot = state["key"], state["slot"]
        self.arena = _ARENAS.get(self.key)  # keeps the mapping alive while the batch is in use

    def __del__(self) -> None:
        if self.arena is not None:
            self.arena.release(self.slot)


class ArenaTensor:
    """A tensor of a batch built in an arena slot, as it crosses from the worker (offset, shape, dtype). In the
    main process :meth:`tensor` maps it without a copy; the tensor keeps the slot's lease alive."""

    def __init__(self, lease: SlotLease, offset: int, shape: tuple[int, ...], dtype: str):
        self.lease, self.offset, self.shape, self.dtype = lease, offset, shape, dtype

    @property
    def __array_interface__(self) -> dict[str, Any]:
        arena = self.lease.arena
        if arena is None:
            raise RuntimeError("an arena batch tensor can only be read in the process that received it")
        return {"version": 3, "shape": self.shape, "typestr": np.dtype(self.dtype).str,
                "data": (arena.address(self.lease.slot) + self.offset, False)}

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self))  # the array's base is this object: the lease lives on

    def pin_memory(self, device: Any = None) -> torch.Tensor:  # the DataLoader's pinning thread calls this
        return self.tensor().pin_memory()


SMALL_BYTES = 1 << 20  # received tensors below this are copied out of the arena slot (see _resolve)


def _resolve(batch: Any) -> Any:
    """A received batch with its :class:`ArenaTensor` parts as tensors. Small ones (lengths, ids, boxes) are
    copied, so that a consumer keeping one (a model's encoding that holds ``num_regions``) does not hold the
    slot of a whole batch; the features stay in place."""
    if isinstance(batch, ArenaTensor):
        t = batch.tensor()
        return t.clone() if t.nbytes < SMALL_BYTES else t
    if isinstance(batch, dict):
        return {k: _resolve(v) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_resolve(v) for v in batch)
    return batch


class _Batches:
    """A DataLoader iterator whose batches come out with their :class:`ArenaTensor` parts as tensors; holds
    the arena (the loader itself may be gone: ``next(iter(loader(...)))``)."""

    def __init__(self, it: Any, arena: BatchArena | None):
        self.it, self.arena = it, arena

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> Any:
        return _resolve(next(self.it))

    def __len__(self) -> int:
        return len(self.it)


class Loader(DataLoader):
    """A DataLoader whose workers build batches in a :class:`BatchArena` (when the dataset says how large a
    sample is: ``sample_nbytes``); iterating yields the batches with their tensors in place."""

    def __init__(self, dataset: Dataset, **kw: Any):
        self._arena_key = next(_ARENA_KEYS)
        if kw.get("num_workers", 0) > 0:
            kw["worker_init_fn"] = partial(_init_worker, self._arena_key, kw.get("worker_init_fn"))
        super().__init__(dataset, **kw)
        self._arena: BatchArena | None = None
        self._iter: Any = None

    def _max_batch(self) -> int:
        if self.batch_size is not None:
            return int(self.batch_size)
        batches = getattr(self.batch_sampler, "batches", self.batch_sampler)
        return max((len(b) for b in batches), default=0) if isinstance(batches, list | tuple) else 0

    def __iter__(self) -> _Batches:  # type: ignore[override]
        sample = getattr(self.dataset, "sample_nbytes", None)
        if self.num_workers > 0 and self._arena is None and sample is not None and sample() > 0:
            slots = PREFETCH_FACTOR + ARENA_SPARE_SLOTS
            nbytes = sample() * self._max_batch() + 64 * _ALIGN
            if nbytes > 64 * _ALIGN:  # made before the first workers fork (they inherit it)
                self._arena = BatchArena(self._arena_key, self.num_workers, slots, nbytes)
        self._iter = super().__iter__()
        return _Batches(self._iter, self._arena)

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (benchmarks)."""
        return [w.pid for w in getattr(self._iter, "_workers", [])]


def loader(dataset: Dataset, batches: list[list[int]] | Sampler | None = None, batch_size: int = 128,
           num_workers: int = 0, collate=None, pin_memory: bool = False, persistent: bool = False) -> Loader:
    """A :class:`Loader` over ``dataset``: given ``batches`` (lists of indices, or a batch sampler such as
    :class:`BatchList`) or consecutive batches of ``batch_size``. With workers: ``PREFETCH_FACTOR`` batches
    prefetched per worker, built in reused shared memory (:class:`BatchArena`), and, when ``persistent``,
    workers kept alive between passes. ``pin_memory`` (for a CUDA device) copies each batch to page-locked
    memory so host → GPU copies can overlap compute."""
    kw: dict[str, Any] = {"num_workers": num_workers, "collate_fn": collate, "pin_memory": pin_memory}
    if num_workers > 0:
        kw["prefetch_factor"] = PREFETCH_FACTOR
        kw["persistent_workers"] = persistent
    if batches is not None:
        return Loader(dataset, batch_sampler=batches, **kw)
    return Loader(dataset, batch_size=batch_size, shuffle=False, **kw)
