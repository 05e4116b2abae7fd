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

Ablations of the position features (``position``; the paper has no ablation table: its Tables 1-2 compare
PFAN with SCAN, i.e. with regions that carry no position features):
- ``attention`` (default) — eq. 5–8 as above;
- ``area`` — γ_ij = a_ij / Σ_j a_ij: the block embeddings weighted by overlap alone (no eq. 5–6 attention);
- ``none`` — no position features: v'_i = FC(v_i) (no block embedding, no M; blocks.h5 is not read), SCAN's
  region encoder with PFAN's other settings (the predefined variant ``no_position``).

PFAN t-i+i-t (the paper's headline) is the average of a t2i and an i2t model (``fuse: [t2i, i2t]``).
Config keys: SCAN's plus ``block_dim`` (200), ``position_norm`` (renorm | softmax), ``position``
(attention | area | none), ``max_term`` (0.0), ``position_bias`` (false). ``data_info['blocks_K']`` gives K.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from itmatch.models.base import Batch
from itmatch.models.scan import SCAN

#: values of the ``position`` setting (module docstring)
POSITION_MODES = ("attention", "area", "none")


class PositionAttention(nn.Module):
    """Region features [B,R,D] + block ids/weights [B,R,L] → position vectors p [B,R,ι] (eq. 5–8); with
    ``attention=False`` the weights are the normalised overlap areas alone (no M)."""

    def __init__(self, feature_dim: int, K: int, block_dim: int = 200, position_norm: str = "renorm",
                 attention: bool = True, bias: bool = False):
        super().__init__()
        if position_norm not in ("renorm", "softmax"):
            raise ValueError(f"position_norm must be 'renorm' (paper) or 'softmax' (released code), "
                             f"got {position_norm!r}")
        self.K = K
        self.embed = nn.Embedding(K * K + 1, block_dim, padding_idx=K * K)
        self.attention = attention
        if attention:
            self.M = nn.Parameter(torch.empty(feature_dim, block_dim))
            nn.init.xavier_uniform_(self.M)
        self.bias = nn.Parameter(torch.zeros(block_dim)) if bias and attention else None
        self.position_norm = position_norm

    def forward(self, feats: torch.Tensor, block_index: torch.Tensor, block_weight: torch.Tensor
                ) -> torch.Tensor:
        gamma, b = self.weights(feats, block_index, block_weight)
        return (gamma.unsqueeze(-1) * b).sum(2)  # [B, R, ι]   eq. 7

    def weights(self, feats: torch.Tensor, block_index: torch.Tensor, block_weight: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """γ [B, R, L] (eq. 5–6, 8) and the block embeddings b [B, R, L, ι] they weight."""
        b = self.embed(block_index.long().clamp(0, self.K * self.K))  # [B, R, L, ι]
        if not self.attention:  # position: area
            a = block_weight.to(b.dtype)
            return a / a.sum(-1, keepdim=True).clamp(min=1e-12), b
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
                 position_norm: str = "renorm", position: str = "attention", position_bias: bool = False,
                 **kw: Any):
        if position not in POSITION_MODES:
            raise ValueError(f"models.pfan.position must be one of {', '.join(POSITION_MODES)}, got {position!r}")
        with_position = position != "none"
        super().__init__(vocab_size, feature_dim,
                         region_input_dim=feature_dim + (block_dim if with_position else 0), **kw)
        self.position_mode = position
        self.position = (PositionAttention(feature_dim, blocks_K, block_dim, position_norm,
                                           attention=position == "attention", bias=position_bias)
                         if with_position else None)

    @classmethod
    def inputs(cls, cfg: dict[str, Any]) -> frozenset[str]:
        """blocks.h5, except without position features (``position: none``)."""
        return frozenset() if cfg.get("position") == "none" else cls.requires

    @classmethod
    def from_config(cls, cfg: dict[str, Any], data_info: dict[str, Any]) -> PFAN:
        kw = cls._kwargs(cfg, data_info)
        keys = ("block_dim", "position_norm", "position", "max_term", "position_bias")
        kw.update({k: cfg[k] for k in keys if k in cfg})
        if "blocks_K" in data_info:
            kw["blocks_K"] = int(data_info["blocks_K"])
        elif cls.inputs(cfg):
            raise KeyError("PFAN needs data_info['blocks_K'] (blocks.h5 attribute K)")
        return cls(**kw)

    def region_inputs(self, images: Batch) -> torch.Tensor:
        feats = images["features"]
        if self.position is None:  # position: none
            return feats
        if "block_index" not in images:
            raise KeyError("PFAN needs images['block_index'] / ['block_weight'] (blocks.h5)")
        p = self.position(feats, images["block_index"], images["block_weight"])
        return torch.cat([feats, p], dim=-1)  # [B, R, D + ι]
