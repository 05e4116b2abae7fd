"""SMFEA: Structured Multi-modal Feature Embedding and Alignment (Ge et al., ACM MM 2021).

Pieces (equation numbers from the paper):

- Instance-level features (eq. 1–4): regions FC 2048 → D (and words: embedding 300 → bi-GRU D,
  directions averaged) are pooled by one self-attention step whose query is their mean:
  α = softmax_i(q · v_i), V^D = Σ α_i v_i with q = mean of the valid v_i. ``pool_scaled`` divides the
  logits by √D as in the scaled dot-product attention of [28] the paper follows (eq. 2 writes no
  scale; ``false`` is literal).
- VCS-Tree / TCS-Tree (eq. 5–14, :mod:`itmatch.models.tree_lstm`): one structured tree encoder per
  modality on V^D / S^D giving V^T / S^T and node logits (entities at nodes 1,3,5,7, relations at
  2,4,6). S^T follows eq. 14 like V^T (the prose's "plus S^D" is left out: S^D already enters the
  fusion with weight β_d).
- Fusion (eq. 15–16): V^F = β_d V^D + β_t V^T + β_c V^C; each part is l2-normalised before the sum
  and V^F is l2-normalised after it, so ``score`` (cosine, eq. 17) is a matrix product.
- Loss (eq. 20, :meth:`SMFEA.loss`): ranking loss on the fused vectors (``criterion``, hardest
  negatives unless the training config says otherwise) + ``ce_weight`` · L_CE + ``kl_weight`` · D_KL.
  L_CE (eq. 18): cross-entropy of every node of both trees against the pair's referral-tree label,
  null nodes (label −1) masked, summed over nodes and both trees, averaged over the batch's pairs.
  D_KL (eq. 19): KL(P^V ‖ P^S) = Σ P^V log(P^V / P^S) per node, i.e. the *visual* node distribution is
  the reference (target) distribution and the textual one is the approximation; summed over the
  7 nodes, averaged over pairs; gradients flow into both trees (nothing detached). All 7 nodes enter
  the KL (the paper does not mask it; ``kl_mask_null: true`` restricts it to labelled nodes).
- CAC branch (V^C / S^C, CVSE's consensus-aware concepts): NOT implemented. β_c must be 0; the
  default fusion is therefore Table 6's [β_d, β_t, β_c] = [0.6, 0.4, 0.0] row.

Ablations (Tables 5–7) by config: ``use_trees: false`` (w/o trees: V^F = V^D), ``kl_weight: 0``
(w/o D_KL), ``ce_weight: 0`` (w/o L_CE), ``structure: chain`` (chain-based encoder) or ``linear``.

Referral-tree labels: ``captions['tree_labels']`` int64 [C, 7] (node 1..7 in in-order,
entity-dictionary ids at nodes 1,3,5,7 and relation-dictionary ids at 2,4,6, −1 = null).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from itmatch.config import schema_defaults
from itmatch.models.base import Batch, MatchingModel
from itmatch.models.encoders import GRUTextEncoder, RegionEncoder, l2norm, length_mask, masked_mean, masked_softmax
from itmatch.models.tree_lstm import ENTITY_NODES, RELATION_NODES, StructuredTreeEncoder

DEFAULTS: dict[str, Any] = schema_defaults("models.smfea")  # the model's keys and defaults (their one home)


def attention_pool(x: torch.Tensor, lengths: torch.Tensor, scaled: bool = True) -> torch.Tensor:
    """Self-attention pooling with the mean as query (eq. 1–3). x [B, N, D], lengths [B] → [B, D]."""
    mask = length_mask(lengths.clamp(min=1), x.shape[1])                         # [B, N]
    q = masked_mean(x, mask)                                                     # eq. 1
    logits = torch.einsum("bd,bnd->bn", q, x)                                    # q · v_i
    if scaled:
        logits = logits / math.sqrt(x.shape[-1])
    alpha = masked_softmax(logits, mask)                                         # eq. 2
    return torch.einsum("bn,bnd->bd", alpha, x)                                  # eq. 3


def node_labels(tree_labels: torch.Tensor) -> torch.Tensor:
    """Referral-tree labels [C, 7] → int64 (−1 = null); see the module docstring for the layout."""
    if tree_labels.dim() == 2 and tree_labels.shape[1] == 7:
        return tree_labels.long()
    raise ValueError(f"tree_labels must be [C, 7], got {tuple(tree_labels.shape)}")


def node_cross_entropy(ent_logits: torch.Tensor, rel_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over non-null nodes of CE, per sample [B]. ent [B,4,E], rel [B,3,Rl], labels [B,7] (−1 = null)."""
    ent_y = labels[:, list(ENTITY_NODES)]
    rel_y = labels[:, list(RELATION_NODES)]
    ce_e = F.cross_entropy(ent_logits.transpose(1, 2), ent_y.clamp(min=0), reduction="none")  # [B, 4]
    ce_r = F.cross_entropy(rel_logits.transpose(1, 2), rel_y.clamp(min=0), reduction="none")  # [B, 3]
    return (ce_e * (ent_y >= 0)).sum(1) + (ce_r * (rel_y >= 0)).sum(1)


def node_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) = Σ_c P log(P/Q) per node: [..., n_classes] logits → [...]; P is the reference."""
    log_p = p_logits.log_softmax(-1)
    log_q = q_logits.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class SMFEA(MatchingModel):
    requires = frozenset({"trees"})

    def __init__(self, vocab_size: int, feature_dim: int, n_entities: int, n_relations: int, **cfg: Any):
        super().__init__()
        unknown = set(cfg) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"models.smfea: unknown keys {sorted(unknown)}")
        c = {**DEFAULTS, **cfg}
        if c["beta_c"] != 0:
            raise ValueError("models.smfea.beta_c must be 0: the CVSE consensus-aware concept branch (V^C/S^C) "
                             "is not implemented (see itmatch/models/smfea.py)")
        self.cfg = c
        D = c["embed_dim"]
        self.img_enc = RegionEncoder(feature_dim, D, normalize=False)
        self.txt_enc = GRUTextEncoder(vocab_size, D, word_dim=c["word_dim"], normalize=False)
        self.use_trees = bool(c["use_trees"])
        if self.use_trees:
            args = (D, c["node_input_dim"], c["hidden_dim"], n_entities, n_relations, c["structure"])
            self.vis_tree = StructuredTreeEncoder(*args)
            self.txt_tree = StructuredTreeEncoder(*args)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], data_info: dict[str, Any]) -> SMFEA:
        for key in ("vocab_size", "feature_dim", "n_entities", "n_relations"):
            if key not in data_info:
                raise KeyError(f"SMFEA needs data_info[{key!r}] (from tokens / trees / regions.h5)")
        # an empty dictionary (tiny data) still gets one class: all its labels are null and masked
        return cls(int(data_info["vocab_size"]), int(data_info["feature_dim"]), max(1, int(data_info["n_entities"])),
                   max(1, int(data_info["n_relations"])), **cfg)

    # -- encoders -------------------------------------------------------------------------------
    def _fuse(self, d: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        c = self.cfg
        out = c["beta_d"] * l2norm(d)
        if t is not None:
            out = out + c["beta_t"] * l2norm(t)
        return l2norm(out)

    def _images(self, images: Batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """→ (V^F [B, D], entity logits [B,4,E] or None, relation logits [B,3,R] or None)."""
        x = self.img_enc(images["features"].float(), images["num_regions"])
        vd = attention_pool(x, images["num_regions"], self.cfg["pool_scaled"])
        if not self.use_trees:
            return self._fuse(vd, None), None, None
        vt, ent, rel = self.vis_tree(vd)
        return self._fuse(vd, vt), ent, rel

    def _captions(self, captions: Batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        w = self.txt_enc(captions["tokens"], captions["lengths"])
        sd = attention_pool(w, captions["lengths"], self.cfg["pool_scaled"])
        if not self.use_trees:
            return self._fuse(sd, None), None, None
        st, ent, rel = self.txt_tree(sd)
        return self._fuse(sd, st), ent, rel

    def encode_images(self, images: Batch) -> torch.Tensor:
        return self._images(images)[0]

    def encode_captions(self, captions: Batch) -> torch.Tensor:
        return self._captions(captions)[0]

    def score(self, img: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
        return img @ cap.t()  # cosine: both sides are unit vectors

    # -- loss (eq. 20) --------------------------------------------------------------------------
    def loss(self, images: Batch, captions: Batch, criterion: nn.Module) -> tuple[torch.Tensor, dict[str, float]]:
        vf, v_ent, v_rel = self._images(images)
        sf, s_ent, s_rel = self._captions(captions)
        rank = criterion(vf @ sf.t())
        logs = {"rank_loss": float(rank.detach())}
        total = rank
        if not self.use_trees:
            return total, logs
        c = self.cfg
        labels = None
        if c["ce_weight"] > 0 or c["kl_mask_null"]:
            if "tree_labels" not in captions:
                raise KeyError("SMFEA.loss needs captions['tree_labels'] (referral trees) for L_CE")
            labels = node_labels(captions["tree_labels"]).to(vf.device)
        if c["ce_weight"] > 0:
            ce = (node_cross_entropy(v_ent, v_rel, labels) + node_cross_entropy(s_ent, s_rel, labels)).mean()
            total = total + c["ce_weight"] * ce
            logs["ce_loss"] = float(ce.detach())
        if c["kl_weight"] > 0:
            kl_nodes = torch.cat([node_kl(v_ent, s_ent), node_kl(v_rel, s_rel)], dim=1)  # [B, 7]
            if c["kl_mask_null"]:
                mask = torch.cat([labels[:, list(ENTITY_NODES)], labels[:, list(RELATION_NODES)]], 1) >= 0
                kl_nodes = kl_nodes * mask
            kl = kl_nodes.sum(1).mean()
            total = total + c["kl_weight"] * kl
            logs["kl_loss"] = float(kl.detach())
        return total, logs
