"""Hashes used for provenance (weights in HDF5 attributes, code versions in metrics)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_hash(*modules: str) -> str:
    """SHA-256 over the source files of the given ``itmatch`` sub-packages or modules.

    Used as a rule ``params:`` value so that editing a stage's code reruns that stage (Snakemake
    tracks scripts, not the modules they import).
    """
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for name in sorted(modules):
        rel = Path(*name.split(".")[1:]) if name.startswith("itmatch") else Path(*name.split("."))
        target = root / rel
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
