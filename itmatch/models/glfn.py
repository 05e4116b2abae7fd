"""GLFN: Generative Label Fused Network (Zhao et al., 2023).

Image side (eq. 1–14), per region i:
    o_i  = [i_i, v^t_i]                        visual feature (2048) ⊕ BERT vector of its "attribute object" tag
    o'_i = f(o_i)                              linear compression to D_b (eq. 7)
    β_im = tanh(o'_i · v^b_im)                 v^b_im: embedding (D_b) of the m-th of the region's L blocks (eq. 8)
    γ_im ∝ softmax_m(β_im) · w^b_im            re-weighted by the blocks' overlap weights, renormalised (eq. 9–11)
    p_i  = Σ_m γ_im v^b_im                     position attention vector (eq. 12)
    v^o_i = l2norm(FC([i_i, v^t_i, p_i]))      one linear layer to D (eq. 13–14)
This is PFAN's position attention whose query is the region+tag vector compressed to D_b.
Eq. 13 writes [o_i, p_i, t_i] with o_i already holding the tag; the tag enters once here.
Eq. 10 writes att' (pre-softmax) but the prose and PFAN's eq. 8 apply the softmax first: we follow PFAN.
``use_tags: false`` is Table 3's No-Tag (o_i = i_i, no tag vector anywhere).

Text side (eq. 15–27): frozen per-token BERT features (768, from the text stage) → FC to 300 →
bi-GRU (D), the directions averaged, l2-normalised. Table 3 ablations: ``text: gru`` (Only-GRU: word
embeddings 300 from the vocabulary instead of BERT) and ``text: bert`` (Only-BERT: BERT features → one
linear layer to D, no GRU).
The paper's bi-GRU dropout of 0.5 is not applied: on a one-layer GRU (as here and in SCAN's code the
release builds on) PyTorch's GRU dropout has no effect.

Similarity (eq. 28–33): SCAN's stacked cross attention (``itmatch.models.attention``) in both
directions, each averaged over the query fragments (eq. 31–32, SCAN's AVG aggregation), fused as
S = α S_i2t + (1−α) S_t2i (α = 0.5). The paper (§4.2) trains the t2i and the i2t model separately and
fuses their similarity matrices at test time: ``fuse: [t2i, i2t]`` (the default) trains one model per
``direction`` (rule train_part: each with its own optimiser, gradient clipping, log and best epoch) and
evaluation sums the parts weighted by :attr:`GLFN.fusion_weight` (α for i2t, 1 − α for t2i). Without
``fuse`` (``fuse: []``) one module holds both: ``separate_branches: true`` gives two independent encoder
sets, each trained with its own hardest-negative loss (eq. 34) on its own direction (the two losses
summed, one optimiser and one best epoch for both); ``separate_branches: false`` shares the encoders and
trains on the fused similarity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from itmatch.config import schema_defaults
from itmatch.models.attention import xattn_scores
from itmatch.models.base import Batch, MatchingModel
from itmatch.models.encoders import GRUTextEncoder, l2norm, length_mask
from itmatch.models.pfan import PositionAttention

#: the model's keys and defaults: the schema's ``models.glfn`` (their one home) without ``fuse`` (read by the
#: workflow), plus ``direction`` (t2i | i2t: one part of a fused GLFN, set by the workflow per part)
DEFAULTS: dict[str, Any] = {**{k: v for k, v in schema_defaults("models.glfn").items() if k != "fuse"},
                            "direction": None}
TEXT_MODES = ("bert_gru", "gru", "bert")


class TagPositionImageEncoder(nn.Module):
    """Regions + tags + blocks → [B, R, D] (eq. 1–14), padding regions zero.

    The position attention is PFAN's (:class:`itmatch.models.pfan.PositionAttention`) applied to the
    object vector o_i = [i_i, v^t_i]: its bilinear form o_iᵀ M b equals f(o_i)·b with f the linear
    compression of eq. 7 (without bias), M ∈ R^{(2048+768)×D_b}.
    """

    def __init__(self, feature_dim: int, tag_dim: int, K: int, block_dim: int, embed_dim: int,
                 use_tags: bool = True):
        super().__init__()
        self.use_tags = use_tags
        obj_dim = feature_dim + (tag_dim if use_tags else 0)
        self.position = PositionAttention(obj_dim, K, block_dim)                    # eq. 6–12
        self.fc = nn.Linear(obj_dim + block_dim, embed_dim)                         # f, eq. 14
        r = (6.0 ** 0.5) / (obj_dim + block_dim + embed_dim) ** 0.5
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def objects(self, images: Batch) -> torch.Tensor:
        """o_i (eq. 1): [B, R, 2048 (+ tag dim)]."""
        feats = images["features"].float()
        if not self.use_tags:
            return feats
        if "tag_vectors" not in images:
            raise KeyError("GLFN (use_tags) needs images['tag_vectors'] (tags.h5)")
        return torch.cat([feats, images["tag_vectors"].float()], dim=-1)

    def forward(self, images: Batch) -> torch.Tensor:
        if "block_index" not in images:
            raise KeyError("GLFN needs images['block_index'] / ['block_weight'] (blocks.h5)")
        obj = self.objects(images)
        p = self.position(obj, images["block_index"], images["block_weight"].float())
        v = l2norm(self.fc(torch.cat([obj, p], dim=-1)))                            # eq. 13–14
        return v * length_mask(images["num_regions"], v.shape[1]).unsqueeze(-1).to(v.dtype)


class BertLinearEncoder(nn.Module):
    """Only-BERT ablation: per-token BERT features → one linear layer to D, l2-normalised."""

    def __init__(self, input_dim: int, embed_dim: int):
        super().__init__()
        self.fc = nn.Linear(input_dim, embed_dim)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out = l2norm(self.fc(feats))
        return out * length_mask(lengths, out.shape[1]).unsqueeze(-1).to(out.dtype)


class _Branch(nn.Module):
    """One image encoder + one text encoder."""

    def __init__(self, c: dict[str, Any], vocab_size: int, feature_dim: int, tag_dim: int, K: int, bert_dim: int):
        super().__init__()
        D = c["embed_dim"]
        self.img = TagPositionImageEncoder(feature_dim, tag_dim, K, c["block_dim"], D, c["use_tags"])
        self.mode = c["text"]
        if self.mode == "bert_gru":
            self.txt = GRUTextEncoder(None, D, word_dim=c["word_dim"], input_dim=bert_dim)
        elif self.mode == "gru":
            self.txt = GRUTextEncoder(vocab_size, D, word_dim=c["word_dim"])
        else:
            self.txt = BertLinearEncoder(bert_dim, D)

    def encode_captions(self, captions: Batch) -> dict[str, torch.Tensor]:
        lengths = captions["lengths"]
        if self.mode == "gru":
            words = self.txt(captions["tokens"], lengths)
        else:
            if "bert" not in captions:
                raise KeyError("GLFN (text: bert_gru / bert) needs captions['bert'] (bert.h5)")
            words = self.txt(captions["bert"].float(), lengths)
        return {"words": words, "lengths": lengths}

    def encode_images(self, images: Batch) -> dict[str, torch.Tensor]:
        return {"regions": self.img(images), "num_regions": images["num_regions"]}


class GLFN(MatchingModel):
    requires = frozenset({"blocks", "tags", "bert"})

    def __init__(self, vocab_size: int, feature_dim: int, tag_dim: int, blocks_K: int, bert_dim: int,
                 **cfg: Any):
        super().__init__()
        unknown = set(cfg) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"models.glfn: unknown keys {sorted(unknown)}")
        c = {**DEFAULTS, **cfg}
        if c["text"] not in TEXT_MODES:
            raise ValueError(f"models.glfn.text must be one of {TEXT_MODES}, got {c['text']!r}")
        if not 0.0 <= c["alpha"] <= 1.0:
            raise ValueError(f"models.glfn.alpha must be in [0, 1], got {c['alpha']}")
        if c["direction"] not in (None, "t2i", "i2t"):
            raise ValueError(f"models.glfn direction must be 't2i' or 'i2t', got {c['direction']!r}")
        self.cfg = c
        self.direction = c["direction"]
        args = (c, vocab_size, feature_dim, tag_dim, blocks_K, bert_dim)
        if self.direction is not None:                 # one separately trained part of the fused model
            setattr(self, self.direction, _Branch(*args))
        else:
            self.t2i = _Branch(*args)
            self.i2t = _Branch(*args) if c["separate_branches"] else self.t2i
        self.requires = self.inputs(c)

    @classmethod
    def inputs(cls, cfg: dict[str, Any]) -> frozenset[str]:
        c = {**DEFAULTS, **cfg}
        tags = {"tags"} if c["use_tags"] else set()
        bert = {"bert"} if c["text"] != "gru" else set()
        return frozenset({"blocks"} | tags | bert)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], data_info: dict[str, Any]) -> GLFN:
        c = {**DEFAULTS, **cfg}
        need = ["vocab_size", "feature_dim", "blocks_K"]
        need += ["tag_dim"] if c["use_tags"] else []
        need += ["bert_dim"] if c["text"] != "gru" else []
        for key in need:
            if key not in data_info:
                raise KeyError(f"GLFN needs data_info[{key!r}]")
        return cls(data_info["vocab_size"], data_info["feature_dim"], data_info.get("tag_dim", 0),
                   data_info["blocks_K"], data_info.get("bert_dim", 0), **cfg)

    @property
    def fusion_weight(self) -> float | None:
        """Weight of this part's similarities when evaluation fuses the parts (eq. 33): α for i2t, 1 − α for
        t2i; None for an unfused model."""
        if self.direction is None:
            return None
        return self.cfg["alpha"] if self.direction == "i2t" else 1.0 - self.cfg["alpha"]

    @property
    def branches(self) -> list[tuple[str, _Branch]]:
        if self.direction is not None:
            return [(self.direction, getattr(self, self.direction))]
        return [("t2i", self.t2i), ("i2t", self.i2t)] if self.cfg["separate_branches"] else [("shared", self.t2i)]

    def encode_images(self, images: Batch) -> dict[str, dict[str, torch.Tensor]]:
        return {name: br.encode_images(images) for name, br in self.branches}

    def encode_captions(self, captions: Batch) -> dict[str, dict[str, torch.Tensor]]:
        return {name: br.encode_captions(captions) for name, br in self.branches}

    def direction_scores(self, img: dict[str, torch.Tensor], cap: dict[str, torch.Tensor], direction: str
                         ) -> torch.Tensor:
        """[I, C] stacked-cross-attention similarity of one direction ('t2i' or 'i2t')."""
        lam = self.cfg["lambda_t2i"] if direction == "t2i" else self.cfg["lambda_i2t"]
        return xattn_scores(direction, img["regions"], img["num_regions"], cap["words"], cap["lengths"],
                            lambda_softmax=lam, agg="Mean", max_elems=self.cfg["max_elems"])

    def _pair(self, img: dict, cap: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg["separate_branches"]:
            return (self.direction_scores(img["t2i"], cap["t2i"], "t2i"),
                    self.direction_scores(img["i2t"], cap["i2t"], "i2t"))
        return (self.direction_scores(img["shared"], cap["shared"], "t2i"),
                self.direction_scores(img["shared"], cap["shared"], "i2t"))

    def score(self, img: dict, cap: dict) -> torch.Tensor:
        if self.direction is not None:                                       # one part: its own direction
            return self.direction_scores(img[self.direction], cap[self.direction], self.direction)
        s_t2i, s_i2t = self._pair(img, cap)
        a = self.cfg["alpha"]
        return a * s_i2t + (1 - a) * s_t2i                                   # eq. 33

    def loss(self, images: Batch, captions: Batch, criterion: nn.Module) -> tuple[torch.Tensor, dict[str, float]]:
        if self.direction is not None:
            return super().loss(images, captions, criterion)
        s_t2i, s_i2t = self._pair(self.encode_images(images), self.encode_captions(captions))
        if self.cfg["separate_branches"]:
            l_t2i, l_i2t = criterion(s_t2i), criterion(s_i2t)
            loss = l_t2i + l_i2t
            return loss, {"rank_loss": float(loss.detach()), "rank_loss_t2i": float(l_t2i.detach()),
                          "rank_loss_i2t": float(l_i2t.detach())}
        a = self.cfg["alpha"]
        loss = criterion(a * s_i2t + (1 - a) * s_t2i)
        return loss, {"rank_loss": float(loss.detach())}
