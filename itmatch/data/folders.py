"""Ingest of your own data declared in config (docs/data.md "Your own data"): an image folder with a table of
captions (``kind: captions``) or alone (``kind: images``) → the same ``images.parquet`` + ``captions.parquet``
as the Karpathy-JSON ingest (:mod:`itmatch.data.ingest`, the artifact contract in ``docs/contract.md``).

- The captions table: by suffix ``.csv`` / ``.tsv`` (a header row), ``.jsonl`` (one JSON object a line) or
  ``.parquet``; columns ``file`` (the image, relative to the folder) and ``caption``, optionally ``split``
  (``train`` / ``val`` / ``test``, ``restval`` as in the Karpathy JSONs; then on every row, the same for all rows
  of an image). Other columns are ignored. An image's captions are its rows in table order; images are numbered
  (``image_id`` 0, 1, ...) in order of first appearance, captions by their row (``caption_id`` = row - 1).
  Messages name rows counted from 1 (the header excluded; for JSON Lines row = line).
- Without a ``split`` column the images are split by a seeded permutation (``datasets.<name>.split``): the
  first ``round(test·N)`` test, the next ``round(val·N)`` val (at least one each when the fraction is > 0), the
  rest train.
- ``kind: images``: every image file under the folder (recursively; suffixes :data:`IMAGE_SUFFIXES`, hidden
  files and folders skipped), or the files a list names, sorted by path; ``image_id`` 0..N-1 in that order,
  split ``test`` for all (so that a model trained elsewhere can score them), no captions.

Both kinds check every image as the Karpathy ingest does (``ingest.verify_images``, ``ingest.on_bad_image``) and
apply the caption-count options (``ingest.captions_per_image``, ``on_bad_caption_count``,
``truncate_extra_captions``) to the captions kind.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from itmatch.data.ingest import IngestError, IngestOptions, _check_images, _kind, fit_caption_count, write_tables
from itmatch.utils.logs import log

#: what counts as an image file in a folder (case-insensitive); others are skipped with a logged count
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
COLUMNS = ("file", "caption")
SPLIT_NAMES = ("train", "val", "test", "restval")
MAX_LISTED = 20  # rows named in one message


@dataclass(frozen=True)
class SplitRatio:
    """The seeded split of a captions table without a ``split`` column (``datasets.<name>.split``)."""

    seed: int
    val: float
    test: float

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> SplitRatio:
        return cls(int(cfg["seed"]), float(cfg["val"]), float(cfg["test"]))


def relative_file(where: str, name: Any, column: str = "file") -> str:
    """``name`` as a path relative to the image folder; an absolute path, ``..``, an empty name or a non-string
    is an :class:`IngestError` naming ``where`` and ``column``."""
    if not isinstance(name, str):
        raise IngestError(f"{where}: column '{column}' must be a string (an image path), got {_kind(name)}")
    rel = PurePosixPath(name.strip())
    if not name.strip() or name.endswith("/") or "\x00" in name:
        raise IngestError(f"{where}: empty or invalid '{column}' {name!r}")
    if rel.is_absolute() or ".." in rel.parts:
        raise IngestError(f"{where}: '{column}' {name!r} is an absolute path or leaves the image folder ('..'); "
                          "it must be relative to the image folder")
    return str(rel)


def _read_jsonl(path: Path) -> pd.DataFrame:
    records = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise IngestError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise IngestError(f"{path} line {n}: expected a JSON object per line, got {_kind(obj)}")
            records.append(obj)
    return pd.DataFrame.from_records(records) if records else pd.DataFrame()


def read_captions_table(path: str | Path) -> pd.DataFrame:
    """The captions table (all columns; CSV cells as strings, empty cells as ""), with named errors for an
    unknown suffix, an unreadable file and missing ``file`` / ``caption`` columns."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise IngestError(f"{path}: unknown captions table format {path.suffix or '(no suffix)'!r}; "
                          f"use one of {', '.join(TABLE_SUFFIXES)}")
    if not path.is_file():
        raise IngestError(f"{path}: captions table not found")
    try:
        if suffix in (".csv", ".tsv"):
            table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False,
                                encoding="utf-8")
        elif suffix == ".jsonl":
            table = _read_jsonl(path)
        else:
            table = pq.read_table(path).to_pandas()
    except IngestError:
        raise
    except UnicodeDecodeError as e:
        raise IngestError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, pa.ArrowException, OSError, ValueError) as e:
        raise IngestError(f"{path}: cannot read the captions table ({type(e).__name__}: {e})") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        found = ", ".join(map(str, table.columns)) or "none"
        raise IngestError(f"{path}: no column {' or '.join(repr(c) for c in missing)} (found columns: {found}); "
                          f"the captions table needs columns {', '.join(COLUMNS)} and optionally split")
    return table


def _cell(path: Path, row: int, column: str, value: Any) -> str:
    """A non-empty string cell, else an :class:`IngestError` naming the row and column."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise IngestError(f"{path} row {row}: column '{column}' is empty")
    if not isinstance(value, str):
        raise IngestError(f"{path} row {row}: column '{column}' must be text, got {_kind(value)}")
    if not value.strip():
        raise IngestError(f"{path} row {row}: column '{column}' is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise IngestError(f"{path} row {row}: column '{column}' is not valid Unicode text") from None
    return value.strip()


def assign_splits(n: int, ratio: SplitRatio) -> list[str]:
    """Splits of ``n`` images: a permutation from ``ratio.seed`` puts ``round(test·n)`` in test, the next
    ``round(val·n)`` in val (at least one each when its fraction is > 0), the rest in train."""
    n_test = max(round(ratio.test * n), 1 if ratio.test > 0 else 0)
    n_val = max(round(ratio.val * n), 1 if ratio.val > 0 else 0)
    if n - n_test - n_val < 1:
        raise IngestError(f"{n} images are too few for a split with val {ratio.val} and test {ratio.test} "
                          f"({n_val} val + {n_test} test leave no train image)")
    order = np.random.default_rng(ratio.seed).permutation(n)
    splits = np.full(n, "train", dtype=object)
    splits[order[:n_test]] = "test"
    splits[order[n_test:n_test + n_val]] = "val"
    return list(splits)


def _missing_files(rows: list[dict[str, Any]], root: Path, source: Path, opt: IngestOptions,
                   dropped: Counter) -> list[dict[str, Any]]:
    """``rows`` whose image file exists; the others are an error naming their table rows (or dropped with a
    logged count under ``ingest.on_bad_image: drop``)."""
    missing = [r for r in rows if not (root / r["file"]).is_file()]
    if not missing:
        return rows
    if opt.on_bad_image != "drop":
        listing = "\n  ".join(f"row {r['row']}: {r['file']}" for r in missing[:MAX_LISTED])
        more = f"\n  … and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
        raise IngestError(f"{source}: {len(missing)} image(s) named in column 'file' do not exist under {root} "
                          f"(set ingest.on_bad_image: drop to drop them and their captions):\n  {listing}{more}")
    dropped["images dropped: missing image file"] += len(missing)
    gone = {id(r) for r in missing}
    return [r for r in rows if id(r) not in gone]


def ingest_captions(table_path: str | Path, image_root: str | Path, images_out: str | Path,
                    captions_out: str | Path, options: IngestOptions | None = None,
                    ratio: SplitRatio | None = None, processes: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``kind: captions``: an image folder + a captions table → the contract's two tables (atomically)."""
    opt = options or IngestOptions()
    ratio = ratio or SplitRatio(0, 0.1, 0.1)
    path, root = Path(table_path), Path(image_root)
    if not root.is_dir():
        raise IngestError(f"{root}: image folder not found")
    table = read_captions_table(path)
    has_split = "split" in table.columns
    images: dict[str, dict[str, Any]] = {}
    for i, rec in enumerate(table.to_dict("records")):
        row = i + 1
        file = relative_file(f"{path} row {row}", _cell(path, row, "file", rec["file"]))
        text = _cell(path, row, "caption", rec["caption"])
        split = _cell(path, row, "split", rec["split"]) if has_split else None
        if split is not None and split not in SPLIT_NAMES:
            raise IngestError(f"{path} row {row}: unknown split {split!r} in column 'split'; "
                              f"allowed: {', '.join(SPLIT_NAMES)}")
        img = images.setdefault(file, {"image_id": len(images), "file": file, "row": row, "split": split,
                                       "captions": [], "index": len(images)})
        if split != img["split"]:
            raise IngestError(f"{path} row {row}: split {split!r} differs from {img['split']!r} of row {img['row']} "
                              f"for the same image {file}")
        img["captions"].append((i, text))
    if not images:
        raise IngestError(f"{path}: the captions table has no rows")
    rows = list(images.values())
    if not has_split:
        for r, split in zip(rows, assign_splits(len(rows), ratio), strict=True):
            r["split"] = split
    dropped: Counter = Counter()
    kept = []
    for r in rows:
        if r["split"] == "restval":
            if not opt.restval_as_train:
                dropped["restval"] += 1
                continue
            r["split"] = "train"
        caps = fit_caption_count(r["captions"], opt, dropped,
                                 f"{path}: image {r['file']} (first at row {r['row']})")
        if caps is not None:
            r["captions"] = caps
            kept.append(r)
    kept = _missing_files(kept, root, path, opt, dropped)
    kept = _check_images(kept, root, opt, processes, dropped)
    return write_tables(kept, images_out, captions_out, str(path), dropped)


def list_images(image_root: str | Path, files: str | Path | None = None) -> list[str]:
    """The images of a ``kind: images`` dataset, relative to ``image_root``, sorted: those the list ``files``
    names (one a line; blank lines and ``#`` comments skipped) or every image file under the folder."""
    root = Path(image_root)
    if not root.is_dir():
        raise IngestError(f"{root}: image folder not found")
    if files is not None:
        listing = Path(files)
        if not listing.is_file():
            raise IngestError(f"{listing}: image list not found")
        seen: dict[str, int] = {}
        missing = []
        for n, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            rel = relative_file(f"{listing} line {n}", line, "path")
            if rel in seen:
                raise IngestError(f"{listing} line {n}: {rel} is listed twice (first on line {seen[rel]})")
            seen[rel] = n
            if not (root / rel).is_file():
                missing.append(f"line {n}: {rel}")
        if missing:
            more = f"\n  … and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
            raise IngestError(f"{listing}: {len(missing)} listed image(s) do not exist under {root}:\n  "
                              + "\n  ".join(missing[:MAX_LISTED]) + more)
        if not seen:
            raise IngestError(f"{listing}: the image list names no files")
        return sorted(seen)
    found, skipped = [], []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith("."):
                continue
            rel = Path(folder, name).relative_to(root).as_posix()
            (found if Path(name).suffix.lower() in IMAGE_SUFFIXES else skipped).append(rel)
    if skipped:
        log.info("%s: %d files skipped (not image suffixes %s), e.g. %s", root, len(skipped),
                 " ".join(IMAGE_SUFFIXES), ", ".join(sorted(skipped)[:5]))
    if not found:
        raise IngestError(f"{root}: no image files (suffixes {' '.join(IMAGE_SUFFIXES)}) in this folder or below")
    return sorted(found)


def ingest_images(image_root: str | Path, images_out: str | Path, captions_out: str | Path,
                  options: IngestOptions | None = None, files: str | Path | None = None,
                  processes: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``kind: images``: an image folder (or a list of its files) → images.parquet (split ``test``) and an
    empty captions.parquet (atomically)."""
    opt = options or IngestOptions()
    root = Path(image_root)
    rows = [{"image_id": i, "split": "test", "file": f, "captions": [], "index": i}
            for i, f in enumerate(list_images(root, files))]
    dropped: Counter = Counter()
    rows = _check_images(rows, root, opt, processes, dropped)
    if not rows:
        raise IngestError(f"{root}: no usable images left (every one was dropped: ingest.on_bad_image: drop)")
    return write_tables(rows, images_out, captions_out, str(root), dropped)
