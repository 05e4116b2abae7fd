"""Resumable long jobs: a partial state beside the output, trusted only while it belongs to the same run.

Model training, detector training, region extraction shards and BERT features keep the work done so far in
a *partial state* file together with a *key*: a fingerprint of everything that decides the result (settings,
data sizes, image ids, model spec). A job started again

- resumes from the partial state when it is readable and its key equals the run's key (and, where the job
  names input files, it is not older than any of them);
- otherwise logs why and starts fresh (the stale file is replaced by the first save);
- when complete, deletes the state (:meth:`TensorState.discard`) or renames the finished partial file onto
  the output (:meth:`H5Partial.finish`), so nothing partial is ever found under the output's name.

Three kinds of partial state: :class:`TensorState`, a ``torch.save`` file of tensors and plain values (model
and detector training; rewritten atomically at every save, read weights-only), :class:`H5Partial`, an
HDF5 file written in place and flushed after every block (extraction shards, BERT features and shards; the key
is its ``fingerprint`` attribute), and :class:`ParquetBlocks`, a folder of Parquet blocks each written
atomically (referral-tree parse shards; the key in its ``key.json``). :func:`sigterm_flag` turns SIGTERM into
a flag a loop checks at a safe point (finish the step, save, exit) instead of an immediate death.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from itmatch.utils.io import write_json, write_parquet
from itmatch.utils.logs import log
from itmatch.utils.tensors import load_tensors, save_tensors

#: the HDF5 attribute of an :class:`H5Partial` holding its key
KEY_ATTR = "fingerprint"


def fingerprint(obj: Any, *blobs: bytes, length: int = 16) -> str:
    """The first ``length`` hex digits of SHA-256 over ``obj`` as sorted-key JSON (other objects by ``str``),
    then ``blobs`` (e.g. an id array's bytes)."""
    h = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode())
    for blob in blobs:
        h.update(blob)
    return h.hexdigest()[:length]


@dataclass(frozen=True)
class TensorState:
    """A job's resumable state in one tensor file (``path``), valid for the run whose key is ``key``."""

    path: Path
    key: str
    what: str = "state"  # names the job in log lines

    def load(self, map_location: str | torch.device = "cpu", inputs: Iterable[str | os.PathLike] = ()
             ) -> dict[str, Any] | None:
        """The saved state (a dict, with ``"key"``) if it exists, is readable, has this run's key and is not
        older than any existing file of ``inputs``; else None (the reason logged)."""
        if not self.path.exists():
            return None
        try:
            saved = load_tensors(self.path, map_location)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            log.info("%s: ignoring %s: unreadable as tensors (%s)", self.what, self.path,
                     (str(e).strip().splitlines() or [type(e).__name__])[0])
            return None
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            log.info("%s: ignoring %s: written with other settings", self.what, self.path)
            return None
        newest_input = max((os.path.getmtime(f) for f in inputs if os.path.exists(f)), default=0.0)
        if os.path.getmtime(self.path) < newest_input:
            log.info("%s: ignoring %s: older than the inputs", self.what, self.path)
            return None
        return saved

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` and the key atomically (a kill leaves the previous state or the new one)."""
        save_tensors(self.path, {"key": self.key, **state})

    def discard(self) -> None:
        """Delete the state (the job is complete)."""
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class H5Partial:
    """An HDF5 output written in place under ``path`` (a partial name) until complete, for the run ``key``."""

    path: Path
    key: str
    what: str = "partial file"

    def open(self, check: Callable[[h5py.File], bool] | None = None) -> h5py.File | None:
        """The partial file opened for appending (``r+``) when it exists, its key attribute equals ``key`` and
        ``check(file)`` (the job's own consistency test; it may raise KeyError, ValueError, TypeError or
        OSError) holds; else None, the reason logged and the stale file removed (the caller creates it anew)."""
        if not self.path.exists():
            return None
        try:
            f = h5py.File(self.path, "r+")
        except OSError as e:
            log.warning("%s: unreadable %s (%s); starting it over", self.path, self.what, e)
            self.path.unlink()
            return None
        try:
            ok = f.attrs.get(KEY_ATTR) == self.key and (check is None or bool(check(f)))
        except (KeyError, ValueError, TypeError, OSError) as e:
            log.warning("%s: damaged %s (%s); starting it over", self.path, self.what, e)
            ok = False
        else:
            if not ok:
                log.info("%s: %s does not match this run (settings, inputs or progress); starting it over",
                         self.path, self.what)
        if not ok:
            f.close()
            self.path.unlink()
            return None
        return f

    def finish(self, out: str | os.PathLike) -> Path:
        """Rename the complete (closed) partial file onto ``out`` (atomic within one file system)."""
        os.replace(self.path, out)
        return Path(out)


@dataclass(frozen=True)
class ParquetBlocks:
    """A table written as numbered Parquet blocks into the folder ``path`` until complete, for the run ``key``.

    Each block is written atomically (a kill leaves whole blocks only); :meth:`open` tells how many blocks of
    this run are there (a folder of another run, or without a readable key, is emptied); :meth:`read` joins
    them; :meth:`discard` removes the folder once the job has written its output."""

    path: Path
    key: str
    what: str = "partial blocks"

    def block(self, k: int) -> Path:
        return self.path / f"block-{k:06d}.parquet"

    def open(self) -> int:
        """The number of consecutive blocks (from block 0) already written by this run."""
        keyfile = self.path / "key.json"
        if self.path.exists():
            try:
                ok = json.loads(keyfile.read_text(encoding="utf-8"))["key"] == self.key
            except (OSError, ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                log.info("%s: %s do not match this run (settings, inputs or rows); starting over", self.path,
                         self.what)
                shutil.rmtree(self.path)
        if not self.path.exists():
            self.path.mkdir(parents=True)
            write_json(keyfile, {"key": self.key})
            return 0
        k = 0
        while self.block(k).exists():
            k += 1
        return k

    def write(self, k: int, table: pa.Table) -> None:
        """Write block ``k`` (atomically)."""
        write_parquet(self.block(k), table)

    def read(self, n: int, schema: pa.Schema) -> pa.Table:
        """Blocks ``0..n-1`` as one table (``schema`` when ``n`` is 0)."""
        tables = [pq.read_table(self.block(k)) for k in range(n)]
        return pa.concat_tables(tables).combine_chunks() if tables else schema.empty_table()

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def sigterm_flag() -> Iterator[Callable[[], bool]]:
    """Within the block SIGTERM only sets a flag; yields a function telling whether it has arrived (the job
    then saves its state and exits). The previous handler is restored on exit."""
    got = {"term": False}

    def on_term(signum: int, frame: Any) -> None:
        got["term"] = True

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield lambda: got["term"]
    finally:
        if old is not None:  # (None: a handler not installed from Python, which cannot be reinstated)
            signal.signal(signal.SIGTERM, old)
