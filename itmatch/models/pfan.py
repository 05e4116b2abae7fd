"""PFAN (Wang et al. 2019, IJCAI): position focused attention network.

Each region r of image i has the L grid cells it overlaps most (``blocks.h5``: cell ids p_ij, padding K²,
normalised overlap areas a_ij). Block embedding (K²+1 entries, ι = 200-d, the padding entry fixed at 0).
Position attention (eq. 5–8):

    β_ij = tanh(v_iᵀ M b_pij)                       (5, 6; v_i the region's visual feature, M ∈ R^{D×ι})
    γ⁰_ij = softmax_j(β_ij) · a_ij                  (8, softmax over the L cells)
    γ_ij = γ⁰_ij / Σ_j γ⁰_ij                         (8, renormalised: padding cells, a = 0, get weight 0)
    p_i = Σ_j γ_ij b_pij                             (7)
    v'_i = FC([v_i, p_i]) → l2norm                   (§2.3: [2048 + 200] → 1024)

then SCAN's cross attention (t2i or i2t) between the v'_i and the bi-GRU words (eq. 9–11).

Differences of PFAN's released code, off by default, each an option:
- ``position_norm: softmax`` — γ = softmax_j(γ⁰) (a second softmax instead of the renormalisation, which
  gives padding cells exp(0) weight);
- ``max_term: 0.5`` — the t2i score adds 0.5 × each word's largest attention weight over the regions,
  aggregated like the main term (see :mod:`itmatch.models.attention`);
- ``position_bias: true`` — β_ij = tanh((M v_i + c)·b_pij): the released code's ``fc_att`` is an
  ``nn.Linear(2048, 200)`` with a bias c (``model_attention.py`` line 66, 87), eq. 5 has none.

A released PFAN checkpoint imports with all three on (:mod:`itmatch.models.released`).

PFAN t-i+i-t (the paper's headline) is the average of a t2i and an i2t model (``fuse: [t2i, i2t]``).
Config keys: SCAN's plus ``block_dim`` (200), ``position_norm`` (renorm | softmax), ``max_term`` (0.0),
``position_bias`` (false).
``data_info['blocks_K']`` gives K.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from itmatch.models.base import Batch
from itmatch.models.scan import SCAN


class PositionAttention(nn.Module):
    """Region features [B,R,D] + block ids/weights [B,R,L] → position vectors p [B,R,ι] (eq. 5–8)."""

    def __init__(self, feature_dim: int, K: int, block_dim: int = 200, position_norm: str = "renorm",
                 bias: bool = False):
        super().__init__()
        if position_norm not in ("renorm", "softmax"):
            raise ValueError(f"position_norm must be 'renorm' (paper) or 'softmax' (released code), "
                             f"got {position_norm!r}")
        self.K = K
        self.embed = nn.Embedding(K * K + 1, block_dim, padding_idx=K * K)
        self.M = nn.Parameter(torch.empty(feature_dim, block_dim))
        nn.init.xavier_uniform_(self.M)
        self.bias = nn.Parameter(torch.zeros(block_dim)) if bias else None
        self.position_norm = position_norm

    def forward(self, feats: torch.Tensor, block_index: torch.Tensor, block_weight: torch.Tensor
                ) -> torch.Tensor:
        gamma, b = self.weights(feats, block_index, block_weight)
        return (gamma.unsqueeze(-1) * b).sum(2)  # [B, R, ι]   eq. 7

    def weights(self, feats: torch.Tensor, block_index: torch.Tensor, block_weight: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """γ [B, R, L] (eq. 5–6, 8) and the block embeddings b [B, R, L, ι] they weight."""
        b = self.embed(block_index.long().clamp(0, self.K * self.K))  # [B, R, L, ι]
        vm = feats @ self.M  # [B, R, ι]
        if self.bias is not None:
            vm = vm + self.bias
        beta = torch.tanh((b * vm.unsqueeze(2)).sum(-1))  # [B, R, L]   eq. 5–6
        g0 = torch.softmax(beta, dim=-1) * block_weight.to(beta.dtype)  # eq. 8 (numerator)
        if self.position_norm == "renorm":
            gamma = g0 / g0.sum(-1, keepdim=True).clamp(min=1e-12)
        else:
            gamma = torch.softmax(g0, dim=-1)
        return gamma, b


class PFAN(SCAN):
    requires = frozenset({"blocks"})

    def __init__(self, vocab_size: int, feature_dim: int, blocks_K: int = 16, block_dim: int = 200,
                 position_norm: str = "renorm", position_bias: bool = False, **kw: Any):
        super().__init__(vocab_size, feature_dim, region_input_dim=feature_dim + block_dim, **kw)
        self.position = PositionAttention(feature_dim, blocks_K, block_dim, position_norm, position_bias)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], data_info: dict[str, Any]) -> PFAN:
        if "blocks_K" not in data_info:
            raise KeyError("PFAN needs data_info['blocks_K'] (blocks.h5 attribute K)")
        kw = cls._kwargs(cfg, data_info)
        kw.update({k: cfg[k] for k in ("block_dim", "position_norm", "max_term", "position_bias") if k in cfg})
        return cls(blocks_K=int(data_info["blocks_K"]), **kw)

    def region_inputs(self, images: Batch) -> torch.Tensor:
        if "block_index" not in images:
            raise KeyError("PFAN needs images['block_index'] / ['block_weight'] (blocks.h5)")
        feats = images["features"]
        p = self.position(feats, images["block_index"], images["block_weight"])
        return torch.cat([feats, p], dim=-1)  # [B, R, D + ι]
