"""Bidirectional triplet ranking loss on a score matrix (VSE++; hardest negatives by default)."""

from __future__ import annotations

import torch
from torch import nn


class ContrastiveLoss(nn.Module):
    """``sim`` [B, B] with positives on the diagonal (row = image, column = caption).

    Loss = Σ_i [m - s(i,i) + s(i,ĉ)]₊ + Σ_c [m - s(c,c) + s(î,c)]₊ with ĉ, î the hardest negatives
    (``max_violation=True``, VSE++) or summed over all negatives (``False``, the SCAN warm-up variant).
    """

    def __init__(self, margin: float = 0.2, max_violation: bool = True):
        super().__init__()
        self.margin = margin
        self.max_violation = max_violation

    def forward(self, sim: torch.Tensor) -> torch.Tensor:
        diag = sim.diagonal().view(-1, 1)
        cost_c = (self.margin + sim - diag).clamp(min=0)      # image i vs negative captions (row)
        cost_i = (self.margin + sim - diag.t()).clamp(min=0)  # caption c vs negative images (column)
        eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        cost_c = cost_c.masked_fill(eye, 0)
        cost_i = cost_i.masked_fill(eye, 0)
        if self.max_violation:
            return cost_c.max(dim=1).values.sum() + cost_i.max(dim=0).values.sum()
        return cost_c.sum() + cost_i.sum()
