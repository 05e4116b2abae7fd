"""BERT vectors of region tag phrases (GLFN §3.2) → ``results/features/{dataset}/tags.h5``.

Each region's tag is the phrase ``"{attribute} {object}"`` (just ``"{object}"`` when the region has
no attribute) from ``regions.parquet``. Every distinct phrase is embedded once with the caption BERT
(:mod:`itmatch.text.bert`): the phrase is tokenised like a caption and its vector is the mean of its
words' vectors (each word the mean of its word-pieces). Stored as a table, not per region:

* ``phrases`` (utf-8 strings [P]), ``vectors`` float16 [P, H];
* ``index`` int32 [N, R]: row ``n`` = ``images.parquet`` row ``n`` (= ``regions.h5`` row), column
  ``r`` = region ``r``; the value is the region's phrase row, ``-1`` for padding / no region;
* ``image_id`` int64 [N]; attributes ``model``, ``dim``.

A model gets region tag vectors as ``vectors[index]`` (with ``index == -1`` masked).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from itmatch.text.bert import load_bert, pick_device, word_features
from itmatch.text.tokenize import tokenize
from itmatch.utils.h5 import NonFiniteError, checksum, open_h5, reading
from itmatch.utils.io import atomic_path
from itmatch.utils.logs import log, progress

REGION_COLUMNS = ("image_id", "region", "object", "attribute")


def tag_phrases(regions: pd.DataFrame) -> list[str]:
    """The phrase of every region row (``""`` when it has no object name)."""
    obj = regions["object"].fillna("").astype(str).str.strip()
    att = regions["attribute"].fillna("").astype(str).str.strip()
    return [(f"{a} {o}" if a else o) if o else "" for a, o in zip(att, obj, strict=True)]


def _tag_codes(t: pa.Table, name: str) -> tuple[np.ndarray, list[str]]:
    """(code per row, stripped names; null rows get the code of an appended ``""``) of a string column."""
    col = t.column(name)
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(pc.cast(col, pa.string()))
    col = col.combine_chunks()
    names = ["" if v is None else str(v).strip() for v in col.dictionary.to_pylist()] + [""]
    codes = col.indices.fill_null(len(names) - 1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, names


def region_phrases(regions_path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """(image_id, region, distinct phrases sorted, each row's phrase id or -1) of regions.parquet: the phrases of
    :func:`tag_phrases`, made once per distinct (attribute, object) pair from the dictionary-encoded columns (COCO's
    4.4M rows as Python strings: 2 GB)."""
    missing = [c for c in REGION_COLUMNS if c not in pq.read_schema(regions_path).names]
    if missing:
        raise ValueError(f"{regions_path}: missing column(s) {', '.join(missing)} (see docs/contract.md)")
    t = pq.read_table(regions_path, columns=list(REGION_COLUMNS), read_dictionary=["object", "attribute"])
    t = t.unify_dictionaries()
    obj, obj_names = _tag_codes(t, "object")
    att, att_names = _tag_codes(t, "attribute")
    pairs, row_pair = np.unique(att * len(obj_names) + obj, return_inverse=True)
    n = len(obj_names)
    phrase = tag_phrases(pd.DataFrame({"object": [obj_names[p % n] for p in pairs],
                                       "attribute": [att_names[p // n] for p in pairs]}))
    table = sorted({p for p in phrase if p})
    pid = {p: i for i, p in enumerate(table)}
    pair_id = np.array([pid.get(p, -1) for p in phrase], dtype=np.int32)
    return (t.column("image_id").to_numpy(), t.column("region").to_numpy(), table,
            pair_id[row_pair.reshape(-1)] if len(pairs) else np.zeros(0, np.int32))


def region_index(image_ids: np.ndarray, region_image: np.ndarray, region_slot: np.ndarray, phrase_ids: np.ndarray,
                 R: int, source: str = "regions.parquet") -> np.ndarray:
    """[N, R] int32 phrase index aligned with ``image_ids`` order (-1 = padding) from the regions' image id and
    slot columns."""
    row_of = pd.Series(np.arange(len(image_ids)), index=pd.Index(image_ids))
    if not row_of.index.is_unique:
        raise ValueError("images.parquet: duplicate image_id")
    rows = row_of.reindex(region_image).to_numpy()
    if np.isnan(rows).any():
        k = int(np.flatnonzero(np.isnan(rows))[0])
        raise ValueError(f"{source}: row {k} has image_id {int(region_image[k])} which is not in images.parquet")
    cols = np.asarray(region_slot).astype(np.int64)
    if len(cols) and (cols.min() < 0 or cols.max() >= R):
        k = int(np.flatnonzero((cols < 0) | (cols >= R))[0])
        raise ValueError(f"{source}: row {k} has region {int(cols[k])}, outside 0..{R - 1}")
    index = np.full((len(image_ids), R), -1, dtype=np.int32)
    index[rows.astype(np.int64), cols] = phrase_ids
    return index


def embed_phrases(phrases: list[str], tok, model, batch_size: int = 256, max_length: int = 64) -> np.ndarray:
    """[P, H] float32: mean of the phrase's word vectors."""

    H = model.config.hidden_size
    out = np.zeros((len(phrases), H), dtype=np.float32)
    words = [tokenize(p) for p in phrases]
    starts = range(0, len(phrases), batch_size)
    for s in progress(starts, "tag phrases", len(starts), unit="batch"):
        feats = word_features(words[s:s + batch_size], tok, model, max_length)
        for j, f in enumerate(feats):
            if len(f):
                out[s + j] = f.mean(0)
    return out


def make_tags(images_path, regions_path, out_path, model: str, R: int | None = None, regions_h5=None,
              batch_size: int = 256, device: str = "auto") -> None:
    """Rule ``tag_vectors``: images.parquet + regions.parquet (+ R from regions.h5) → tags.h5."""


    images = pd.read_parquet(images_path, columns=["image_id"])
    region_image, region_slot, table, phrase_ids = region_phrases(regions_path)
    if R is None:
        if regions_h5 is not None:
            with open_h5(regions_h5) as f, reading(regions_h5):
                R = int(f["features"].shape[1])
        else:
            R = int(region_slot.max()) + 1 if len(region_slot) else 1
    index = region_index(images["image_id"].to_numpy(), region_image, region_slot, phrase_ids, R,
                         str(regions_path))
    tok, net = load_bert(model, pick_device(device))
    vectors = embed_phrases(table, tok, net, batch_size).astype(np.float16)  # checked as stored
    bad = np.flatnonzero(~np.isfinite(vectors).all(1)) if vectors.size else []
    if len(bad):
        raise NonFiniteError(f"{out_path}: dataset 'vectors' row {int(bad[0])} (phrase {table[int(bad[0])]!r}) has "
                             f"non-finite values ({len(bad)} phrase(s)); not written. Check text.bert.model")
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as f:
            # variable-length strings cannot take HDF5 filters: the phrase table has no checksum
            f.create_dataset("phrases", data=np.array(table, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("vectors", data=vectors, **checksum(vectors.shape))
            f.create_dataset("index", data=index, chunks=(min(max(len(index), 1), 4096), R),
                             **checksum(index.shape))
            f.create_dataset("image_id", data=images["image_id"].to_numpy().astype(np.int64),
                             **checksum((len(images),)))
            f.attrs.update({"model": model, "dim": int(vectors.shape[1])})
    log.info("tags: %d regions, %d distinct phrases, %d images × %d slots → %s", len(phrase_ids), len(table),
             len(images), R, Path(out_path))
