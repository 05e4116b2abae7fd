"""The evaluation's saved outputs beside ``metrics.json``: the similarity matrix ``sims.h5`` and ``ranks.parquet``.

``sims.h5`` (docs/contract.md): ``sims`` float32 [I, C] (rows = the evaluated split's images in
``images.parquet`` order, columns = their captions in ``captions.parquet`` order; a fused model's fused
matrix), chunked by rows, fletcher32-checksummed; ``image_id`` [I], ``caption_id`` [C] and
``caption_image_id`` [C] (the image of every caption: the ground truth). For COCO's 1K × 5 protocol it is the
whole 5K test matrix: fold ``k`` is rows ``[1000k, 1000(k+1))`` and the columns of their captions (attribute
``folds``), and the 1K numbers are computed on those sub-blocks (the scores of a pair do not depend on the
other pairs, so the sub-block equals a matrix scored on the fold alone).

``ranks.parquet``: one row per query, all ``i2t`` queries (images, row order) then all ``t2i`` queries
(captions): ``direction``, ``query_id``, ``match_id`` (the best-ranked true caption / the true image),
``rank`` (1-based rank of that match in the whole matrix, ties counted against the model as in the metrics),
``fold`` and ``fold_rank`` (within the query's fold; equal to ``rank`` with one fold), ``top_ids`` /
``top_scores`` (the 10 best candidates in the whole matrix, score descending, equal scores in row / column
order).

Written atomically (a temporary file renamed when complete); :class:`SimsFile` reads rows on demand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa

from itmatch.evaluation.metrics import Evaluation
from itmatch.utils.h5 import checksum, open_h5, reading
from itmatch.utils.io import write_parquet

SIMS = "sims"
CHUNK_BYTES = 1 << 20  # a chunk of sims.h5 holds whole rows, about 1 MB


def create_sims(path: str | Path, image_ids: np.ndarray, caption_ids: np.ndarray, caption_image_ids: np.ndarray,
                attrs: dict[str, Any]) -> h5py.File:
    """A new ``sims.h5`` at ``path`` (the caller's temporary name) with its id datasets, opened for writing."""
    n_img, n_cap = len(image_ids), len(caption_ids)
    f = h5py.File(path, "w")
    rows = max(1, min(n_img, CHUNK_BYTES // (4 * max(n_cap, 1))))
    shape = (n_img, n_cap)
    f.create_dataset(SIMS, shape=shape, dtype=np.float32, chunks=(rows, max(n_cap, 1)) if n_img * n_cap else None,
                     **checksum(shape))
    for name, values in (("image_id", image_ids), ("caption_id", caption_ids),
                         ("caption_image_id", caption_image_ids)):
        v = np.asarray(values, dtype=np.int64)
        f.create_dataset(name, data=v, **checksum(v.shape))
    f.attrs.update({k: v for k, v in attrs.items() if v is not None})
    return f


class SimsFile:
    """A saved ``sims.h5``: ids, the caption → image-row map (``cap_image``), attributes and :meth:`rows`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = open_h5(self.path)
        try:
            with reading(self.path, "ids"):
                for name in (SIMS, "image_id", "caption_id", "caption_image_id"):
                    if name not in self.file:
                        raise ValueError(f"{self.path}: dataset {name!r} missing (see docs/contract.md)")
                self.sims = self.file[SIMS]
                self.image_ids = self.file["image_id"][:]
                self.caption_ids = self.file["caption_id"][:]
                cap_img = self.file["caption_image_id"][:]
            row_of = {int(i): r for r, i in enumerate(self.image_ids)}
            missing = [int(i) for i in cap_img if int(i) not in row_of]
            if missing:
                raise ValueError(f"{self.path}: caption_image_id {missing[0]} is not among the image ids")
            self.cap_image = np.array([row_of[int(i)] for i in cap_img], dtype=np.int64)
            if self.sims.shape != (len(self.image_ids), len(self.caption_ids)):
                raise ValueError(f"{self.path}: sims has shape {self.sims.shape}, the ids say "
                                 f"({len(self.image_ids)}, {len(self.caption_ids)})")
            self.attrs = dict(self.file.attrs)
        except BaseException:
            self.file.close()
            raise

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.sims.shape)  # type: ignore[return-value]

    def rows(self, a: int, b: int) -> np.ndarray:
        """float32 rows ``[a, b)`` (an error names the file when a chunk fails its checksum)."""
        with reading(self.path, f"sims rows {a}..{b}"):
            return self.sims[a:b]

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> SimsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ranks_table(ev: Evaluation, image_ids: np.ndarray, caption_ids: np.ndarray, cap_image: np.ndarray) -> pa.Table:
    """``ranks.parquet`` of an :class:`~itmatch.evaluation.metrics.Evaluation` (see the module docstring)."""
    r = ev.ranks
    image_ids = np.asarray(image_ids, np.int64)
    caption_ids = np.asarray(caption_ids, np.int64)
    n_img, n_cap = len(image_ids), len(caption_ids)
    size = n_img // ev.folds

    def lists(ids: np.ndarray | None, values: np.ndarray, type_: pa.DataType) -> pa.ListArray:
        k = values.shape[1]
        offsets = pa.array(np.arange(0, k * len(values) + 1, k, dtype=np.int32))
        flat = ids[values.reshape(-1)] if ids is not None else values.reshape(-1)
        return pa.ListArray.from_arrays(offsets, pa.array(flat, type_))

    def cat(a: pa.Array, b: pa.Array) -> pa.Array:
        return pa.concat_arrays([a, b])

    return pa.table({
        "direction": pa.array(["i2t"] * n_img + ["t2i"] * n_cap, pa.string()),
        "query_id": pa.array(np.concatenate([image_ids, caption_ids])),
        "match_id": pa.array(np.concatenate([caption_ids[r.i2t_match], image_ids[cap_image]])),
        "rank": pa.array(np.concatenate([r.i2t, r.t2i]) + 1, pa.int64()),
        "fold": pa.array(np.concatenate([np.arange(n_img) // size, np.asarray(cap_image) // size]), pa.int32()),
        "fold_rank": pa.array(np.concatenate([ev.fold_i2t, ev.fold_t2i]) + 1, pa.int64()),
        "top_ids": cat(lists(caption_ids, r.i2t_top, pa.int64()), lists(image_ids, r.t2i_top, pa.int64())),
        "top_scores": cat(lists(None, r.i2t_top_score, pa.float32()), lists(None, r.t2i_top_score, pa.float32())),
    })


def write_ranks(path: str | Path, ev: Evaluation, sims: SimsFile) -> None:
    """``ranks.parquet`` (atomically) for the queries of ``sims``."""
    write_parquet(path, ranks_table(ev, sims.image_ids, sims.caption_ids, sims.cap_image))
