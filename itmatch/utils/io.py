"""Atomic output: write to a temporary name beside the target, rename only when complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from itmatch.utils.logs import log


def _temporary_prefix(path: Path) -> str:
    """The start of every temporary sibling name of ``path`` (any process id)."""
    return f".{path.stem}.tmp-"


def temporary_name(path: str | os.PathLike) -> Path:
    """The temporary sibling of ``path`` used while it is being written (same folder, same suffix)."""
    path = Path(path)
    return path.with_name(f"{_temporary_prefix(path)}{os.getpid()}{path.suffix}")


def remove_stale(path: str | os.PathLike) -> None:
    """Remove temporary siblings of ``path`` (see :func:`temporary_name`) left by a killed earlier run."""
    path = Path(path)
    for stale in path.parent.glob(f"{_temporary_prefix(path)}*"):
        log.info("removing %s, left by an interrupted run", stale)
        _remove(stale)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to ``path``, on any error remove it.

    A killed job leaves at most a dot-file with ``.tmp-`` in its name, never a file under the final name.
    Works for files and for folders.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {path}")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=indent, sort_keys=False)
            fh.write("\n")


def write_parquet(path: str | os.PathLike, table) -> None:
    """Write a pandas DataFrame or pyarrow Table to Parquet atomically."""

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
