"""Model checkpoints (``model.pt``): the one writer and the one reader of their format.

``{"format": "itmatch-checkpoint", "model": name, "parts": [{name, config, data_info, state_dict, epoch, step,
val_rsum, ...}, ...]}``, one part per separately trained direction (fused models). Tensors and plain values
only, read with ``torch.load(weights_only=True)``, so a crafted file cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from itmatch.models.base import MatchingModel
from itmatch.models.registry import build_model
from itmatch.utils.tensors import load_tensors, save_tensors

FORMAT = "itmatch-checkpoint"


def write_checkpoint(path: str | Path, model_name: str, parts: list[dict[str, Any]]) -> None:
    """Write ``model.pt`` of ``model_name`` with these parts."""
    save_tensors(path, {"format": FORMAT, "model": model_name, "parts": parts})


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict (on the CPU), with an error naming the file when it is not one of ours."""
    ck = load_tensors(path)
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ValueError(f"{path}: not an itmatch checkpoint")
    return ck


def load_parts(path: str | Path, device: str | torch.device = "cpu") -> tuple[str, list[MatchingModel]]:
    """(model name, the model of every part in eval mode on ``device``)."""
    return checkpoint_models(read_checkpoint(path), device)


def checkpoint_models(ck: dict[str, Any], device: str | torch.device = "cpu") -> tuple[str, list[MatchingModel]]:
    """:func:`load_parts` of a checkpoint dict already read with :func:`read_checkpoint`."""
    models = []
    for part in ck["parts"]:
        m = build_model(ck["model"], part["config"], part["data_info"])
        m.load_state_dict(part["state_dict"])
        m.to(device).eval()
        models.append(m)
    return ck["model"], models
