"""HDF5 artifacts: checksummed writes, reads whose errors name the file and how to rebuild it, and the
non-finite check of float arrays before they are written.

Every dataset we write with data in it carries HDF5's ``fletcher32`` checksum filter (:func:`checksum`),
so a damaged chunk fails on read instead of returning wrong numbers. Readers open files with :func:`open_h5`
and wrap reads in :func:`reading`: a truncated or corrupted file then raises :class:`ArtifactReadError`
naming the file and the command that rebuilds it (``snakemake --force <file>``, or deleting the file).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np


class ArtifactReadError(OSError):
    """An HDF5 artifact cannot be read (truncated, corrupted chunk); names the file and how to rebuild it."""


class NonFiniteError(ValueError):
    """A float array about to be written holds NaN or inf (names the file, dataset and row)."""


def checksum(shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """``create_dataset`` keyword arguments that add the fletcher32 checksum (chunked layout). Empty for an
    empty shape (HDF5 cannot chunk a zero-sized dataset; nothing to protect there)."""
    if shape is not None and (len(shape) == 0 or 0 in tuple(shape)):
        return {}
    return {"fletcher32": True}


def rebuild_hint(path: str | Path) -> str:
    return (f"the file is truncated or corrupted; rebuild it with `snakemake --force {path}` "
            f"(or delete {path} and run the workflow again)")


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def open_h5(path: str | Path, mode: str = "r") -> h5py.File:
    """``h5py.File(path, mode)``; an unreadable file raises :class:`ArtifactReadError` naming it."""
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise
    except OSError as e:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: not found") from None
        raise ArtifactReadError(f"{path}: cannot open HDF5 file ({_reason(e)}); {rebuild_hint(path)}") from None


@contextmanager
def reading(path: str | Path, what: str = "") -> Iterator[None]:
    """Re-raise HDF5 read failures inside the block (checksum mismatch, truncated data) as
    :class:`ArtifactReadError` naming ``path`` (and ``what``, e.g. the dataset and row)."""
    try:
        yield
    except ArtifactReadError:
        raise
    except (OSError, RuntimeError) as e:
        where = f" ({what})" if what else ""
        raise ArtifactReadError(f"{path}: cannot read{where}: {_reason(e)}; {rebuild_hint(path)}") from None


def check_finite(values: np.ndarray, path: str | Path, dataset: str, row0: int = 0,
                 ids: np.ndarray | None = None, id_name: str = "image_id") -> None:
    """Raise :class:`NonFiniteError` when ``values`` (rows ``row0``…, first axis = rows) has NaN/inf: names the
    file, dataset, first bad row (with its id when ``ids`` gives one per row) and the count of bad rows."""
    v = np.asarray(values)
    if v.dtype.kind not in "fc" or v.size == 0:
        return
    finite = np.isfinite(v)
    if finite.all():
        return
    bad_rows = np.flatnonzero(~finite.reshape(len(v), -1).all(1)) if v.ndim else np.array([0])
    first = int(bad_rows[0])
    ident = f" ({id_name} {int(ids[first])})" if ids is not None and len(ids) > first else ""
    raise NonFiniteError(f"{path}: dataset '{dataset}' row {row0 + first}{ident} has non-finite values "
                         f"({len(bad_rows)} row(s) affected in this write); not written. Check the model or "
                         f"input that produced it")
