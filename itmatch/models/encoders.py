"""Encoders shared by the models (SCAN's, as the papers here reuse them).

- :class:`RegionEncoder`: FC 2048 → d on each region, then (optionally) l2-normalised (SCAN §3.3).
- :class:`GRUTextEncoder`: word embedding (300) → bi-GRU (d), the two directions averaged (SCAN, CAAN
  eq. 2–4), optionally l2-normalised; also accepts precomputed token features (GLFN's BERT path).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """x / (‖x‖ + eps); all-zero rows (padding) stay 0 with a finite gradient (no sqrt'(0) = inf)."""
    # (the norm in float32: in float16 the clamp and eps would underflow to 0 and padding rows give 0/0)
    return x / (upcast(x).pow(2).sum(dim=dim, keepdim=True).clamp(min=1e-30).sqrt() + eps)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is float16 / bfloat16 (mixed precision), else ``x`` itself."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, max_len] bool, True at valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim with ``mask`` (bool, broadcastable) False positions excluded."""
    return logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], mask [B, L] → [B, D]."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


class RegionEncoder(nn.Module):
    """[B, R, D] region features → [B, R, d] (Xavier-uniform init as SCAN)."""

    def __init__(self, feature_dim: int, embed_dim: int, normalize: bool = True):
        super().__init__()
        self.fc = nn.Linear(feature_dim, embed_dim)
        self.normalize = normalize
        r = (6.0 ** 0.5) / (feature_dim + embed_dim) ** 0.5
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor, num_regions: torch.Tensor | None = None) -> torch.Tensor:
        x = self.fc(features)  # [B, R, d]
        if self.normalize:
            x = l2norm(x)
        if num_regions is not None:
            x = x * length_mask(num_regions, x.shape[1]).unsqueeze(-1).to(x.dtype)
        return x


class GRUTextEncoder(nn.Module):
    """Token ids [C, W] (or token features [C, W, H] when ``input_dim`` is set) → [C, W, d].

    The bidirectional GRU's two directions are averaged (SCAN's ``use_bi_gru``); padding rows are zero.
    """

    def __init__(self, vocab_size: int | None, embed_dim: int, word_dim: int = 300, num_layers: int = 1,
                 bidirectional: bool = True, normalize: bool = True, input_dim: int | None = None):
        super().__init__()
        if input_dim is None:
            assert vocab_size is not None, "vocab_size is required for token-id input"
            self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
            nn.init.uniform_(self.embed.weight, -0.1, 0.1)
            self.proj = None
        else:  # precomputed token features (e.g. BERT) → FC to word_dim
            self.embed = None
            self.proj = nn.Linear(input_dim, word_dim)
        self.rnn = nn.GRU(word_dim, embed_dim, num_layers, batch_first=True, bidirectional=bidirectional)
        self.bidirectional = bidirectional
        self.normalize = normalize
        self.embed_dim = embed_dim

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens) if self.embed is not None else self.proj(tokens)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)  # [C, W, word_dim]
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])  # [C, W, d*dirs]
        if self.bidirectional:
            out = (out[..., : self.embed_dim] + out[..., self.embed_dim:]) / 2
        if self.normalize:
            out = l2norm(out)
        return out * length_mask(lengths, out.shape[1]).unsqueeze(-1).to(out.dtype)
