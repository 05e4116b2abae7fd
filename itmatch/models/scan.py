"""SCAN (Lee et al. 2018): stacked cross attention between image regions and words.

Image: FC 2048 → d on each region + l2norm (:class:`RegionEncoder`). Text: word embedding (300) → bi-GRU
(d), the two directions averaged, l2norm (:class:`GRUTextEncoder`). Score: text-to-image (t2i) or
image-to-text (i2t) stacked cross attention (:mod:`itmatch.models.attention`: λ_softmax, clipped l2norm of
the raw logits, LogSumExp / Mean aggregation). One model attends in one ``direction``; SCAN i2t+t2i is
two models trained separately whose similarity matrices are averaged at evaluation (config
``models.scan.fuse: [t2i, i2t]``, handled by the training/evaluation code).

Config keys (``models.scan``): ``embed_dim`` (1024), ``word_dim`` (300), ``num_layers`` (1), ``direction``
(set per fused part), ``raw_norm`` (clipped_l2norm), ``t2i`` / ``i2t``: ``lambda_softmax``, ``agg``,
``lambda_lse`` (defaults: the paper's Flickr30K settings t2i λ₁=9, LogSumExp λ₂=6; i2t λ₁=4, Mean).
"""

from __future__ import annotations

from typing import Any

import torch

from itmatch.models.attention import xattn_scores
from itmatch.models.base import Batch, MatchingModel
from itmatch.models.encoders import GRUTextEncoder, RegionEncoder

ATTENTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "t2i": {"lambda_softmax": 9.0, "agg": "LogSumExp", "lambda_lse": 6.0},
    "i2t": {"lambda_softmax": 4.0, "agg": "Mean", "lambda_lse": 6.0},
}


class SCAN(MatchingModel):
    requires = frozenset()

    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int = 1024, word_dim: int = 300,
                 num_layers: int = 1, direction: str = "t2i", raw_norm: str = "clipped_l2norm",
                 attention: dict[str, Any] | None = None, max_term: float = 0.0, max_elems: int = 1 << 23,
                 region_input_dim: int | None = None):
        super().__init__()
        if direction not in ("t2i", "i2t"):
            raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")
        self.direction = direction
        self.img_enc = RegionEncoder(region_input_dim or feature_dim, embed_dim)
        self.txt_enc = GRUTextEncoder(vocab_size, embed_dim, word_dim, num_layers)
        hp = dict(ATTENTION_DEFAULTS[direction])
        hp.update(attention or {})
        hp["raw_norm"] = raw_norm
        if direction == "t2i":
            hp["max_term"] = max_term
        hp["max_elems"] = max_elems
        self.hp = hp

    @staticmethod
    def _kwargs(cfg: dict[str, Any], data_info: dict[str, Any]) -> dict[str, Any]:
        direction = cfg.get("direction", "t2i")
        kw = {k: cfg[k] for k in ("embed_dim", "word_dim", "num_layers", "raw_norm", "max_elems") if k in cfg}
        return dict(vocab_size=int(data_info["vocab_size"]), feature_dim=int(data_info["feature_dim"]),
                    direction=direction, attention=dict(cfg.get(direction) or {}), **kw)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], data_info: dict[str, Any]) -> SCAN:
        return cls(**cls._kwargs(cfg, data_info))

    def region_inputs(self, images: Batch) -> torch.Tensor:
        """[B, R, D'] inputs of the region FC (SCAN: the pooled features)."""
        return images["features"]

    def encode_images(self, images: Batch) -> dict[str, torch.Tensor]:
        n = images["num_regions"]
        return {"V": self.img_enc(self.region_inputs(images), n), "n": n}  # V [B, R, d]

    def encode_captions(self, captions: Batch) -> dict[str, torch.Tensor]:
        return {"E": self.txt_enc(captions["tokens"], captions["lengths"]), "lens": captions["lengths"]}

    def score(self, img: dict[str, torch.Tensor], cap: dict[str, torch.Tensor]) -> torch.Tensor:
        return xattn_scores(self.direction, img["V"], img["n"], cap["E"], cap["lens"], **self.hp)
