"""Tensor files: ``torch.save`` under a temporary name renamed when complete, ``torch.load`` of tensors only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from itmatch.utils.io import atomic_path


def load_tensors(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors and plain containers; a crafted file cannot run code);
    ``mmap``: map the file's storages instead of reading them (zip-format files only)."""
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def save_tensors(path: str | Path, obj: Any) -> None:
    """``torch.save`` under a temporary name, renamed when complete."""
    with atomic_path(Path(path)) as tmp:
        torch.save(obj, tmp)
