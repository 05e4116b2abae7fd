"""Torch device helpers shared by training, evaluation and the text stages."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's tensors on ``device`` (the batch itself on the CPU)."""
    return batch if device.type == "cpu" else {k: v.to(device, non_blocking=True) for k, v in batch.items()}
