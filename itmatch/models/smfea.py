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
- CAC branch (§3.2.3, V^C / S^C "following [30]", CVSE): :mod:`itmatch.models.concepts` on the concept graph
  of ``concepts.h5`` (:mod:`itmatch.text.concepts`), fed with l2norm(V^D) / l2norm(S^D); its loss
  ``concept_kl_weight`` · KL(q ‖ p) (CVSE's concept-prediction term; 2/3 = CVSE's weight 2 against its fused
  ranking loss's 3, which is 1 in eq. 20) and optionally ``concept_rank_weight`` · ranking loss on V^C / S^C.
  Concept word vectors: GloVe when ``glove`` names a file (checked in :meth:`SMFEA.prepare_training`, before
  any training step), a logged random init otherwise. Default fusion §4.2: β = 0.6 / 0.2 / 0.2.

Ablations (Tables 5–7) by config: ``beta_c: 0`` with ``beta_t: 0.4`` (Table 6 row [0.6, 0.4, 0.0]: no CAC
branch, no concept inputs), ``use_trees: false`` (w/o trees: V^F = β_d V^D + β_c V^C), ``kl_weight: 0``
(w/o D_KL), ``ce_weight: 0`` (w/o L_CE), ``structure: chain`` (chain-based encoder) or ``linear``.

Referral-tree labels: ``captions['tree_labels']`` int64 [C, 7] (node 1..7 in in-order,
entity-dictionary ids at nodes 1,3,5,7 and relation-dictionary ids at 2,4,6, −1 = null). Concept labels
(β_c > 0): ``captions['concept_labels']`` float32 [C, K] (the caption's, multi-hot) and
``captions['image_concept_labels']`` [C, K] (its image's, the union over the image's captions).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from itmatch.config import schema_defaults
from itmatch.models.base import Batch, MatchingModel
from itmatch.models.concepts import ConsensusConcepts, concept_kl
from itmatch.models.encoders import GRUTextEncoder, RegionEncoder, l2norm, length_mask, masked_mean, masked_softmax
from itmatch.models.glove import load_glove
from itmatch.models.tree_lstm import ENTITY_NODES, RELATION_NODES, StructuredTreeEncoder
from itmatch.utils.logs import log

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

    @classmethod
    def inputs(cls, cfg: dict[str, Any]) -> frozenset[str]:
        """Referral trees always; the concepts (concepts.h5) only with the CAC branch (β_c > 0)."""
        return cls.requires | ({"concepts"} if float({**DEFAULTS, **cfg}["beta_c"]) > 0 else frozenset())

    def __init__(self, vocab_size: int, feature_dim: int, n_entities: int, n_relations: int, n_concepts: int = 0,
                 **cfg: Any):
        super().__init__()
        unknown = set(cfg) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"models.smfea: unknown keys {sorted(unknown)}")
        c = {**DEFAULTS, **cfg}
        if c["concept_train_labels"] not in ("image", "caption"):
            raise ValueError(f"models.smfea.concept_train_labels must be image or caption, got "
                             f"{c['concept_train_labels']!r}")
        self.cfg = c
        D = c["embed_dim"]
        self.img_enc = RegionEncoder(feature_dim, D, normalize=False)
        self.txt_enc = GRUTextEncoder(vocab_size, D, word_dim=c["word_dim"], normalize=False)
        self.use_trees = bool(c["use_trees"])
        if self.use_trees:
            args = (D, c["node_input_dim"], c["hidden_dim"], n_entities, n_relations, c["structure"])
            self.vis_tree = StructuredTreeEncoder(*args)
            self.txt_tree = StructuredTreeEncoder(*args)
        self.use_concepts = float(c["beta_c"]) > 0
        if self.use_concepts:
            self.cac = ConsensusConcepts(n_concepts, D, c["concept_dim"], c["concept_label_ratio"],
                                         c["concept_smooth"], c["train_concept_embeddings"])

    @classmethod
    def from_config(cls, cfg: dict[str, Any], data_info: dict[str, Any]) -> SMFEA:
        for key in ("vocab_size", "feature_dim", "n_entities", "n_relations"):
            if key not in data_info:
                raise KeyError(f"SMFEA needs data_info[{key!r}] (from tokens / trees / regions.h5)")
        if float({**DEFAULTS, **cfg}["beta_c"]) > 0 and "n_concepts" not in data_info:
            raise KeyError("SMFEA with beta_c > 0 needs data_info['n_concepts'] (from concepts.h5)")
        # an empty dictionary (tiny data) still gets one class: all its labels are null and masked
        return cls(int(data_info["vocab_size"]), int(data_info["feature_dim"]), max(1, int(data_info["n_entities"])),
                   max(1, int(data_info["n_relations"])), int(data_info.get("n_concepts", 0)), **cfg)

    def prepare_training(self, corpus: Any) -> None:
        """CAC branch: the concept graph from concepts.h5 and the concept word vectors (GloVe from ``glove``, else
        the random init), both logged. A set but missing or malformed GloVe file stops here, before training."""
        if not self.use_concepts:
            return
        self.cac.set_graph(corpus.concept_correlation, str(corpus.paths.concepts))
        names, glove = corpus.concept_names, self.cfg["glove"]
        if glove is None:
            log.info("SMFEA concept vectors: random init, %d concepts (models.smfea.glove is not set)", len(names))
            return
        weight = torch.zeros_like(self.cac.embeddings)
        found = load_glove(glove, names, weight, "models.smfea.glove", "models.smfea.concept_dim")
        if found == 0:
            raise ValueError(f"models.smfea.glove: none of the {len(names)} concepts ({', '.join(names[:5])}, …) "
                             f"is in the GloVe file {glove} (expected lines 'word v1 … v{weight.shape[1]}')")
        with torch.no_grad():
            hit = weight.abs().sum(1) > 0
            self.cac.embeddings[hit] = weight[hit].to(self.cac.embeddings.dtype)
        log.info("SMFEA concept vectors: %d of %d concepts from GloVe %s (the rest: random init)", found,
                 len(names), glove)

    # -- encoders -------------------------------------------------------------------------------
    def _fuse(self, d: torch.Tensor, t: torch.Tensor | None, cc: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 15–16 on l2-normalised parts, l2-normalised."""
        c = self.cfg
        out = c["beta_d"] * l2norm(d)
        if t is not None:
            out = out + c["beta_t"] * l2norm(t)
        if cc is not None:
            out = out + c["beta_c"] * cc   # V^C / S^C are unit vectors already
        return l2norm(out)

    def _images(self, images: Batch) -> tuple[torch.Tensor, ...]:
        """→ (V^F [B, D], entity logits [B,4,E] | None, relation logits [B,3,R] | None, V^C [B, D] | None,
        log concept scores [B, K] | None)."""
        x = self.img_enc(images["features"].float(), images["num_regions"])
        vd = attention_pool(x, images["num_regions"], self.cfg["pool_scaled"])
        vt, ent, rel = self.vis_tree(vd) if self.use_trees else (None, None, None)
        vc, log_p = self.cac.encode_visual(vd) if self.use_concepts else (None, None)
        return self._fuse(vd, vt, vc), ent, rel, vc, log_p

    def _concept_labels(self, captions: Batch) -> torch.Tensor:
        key = "image_concept_labels" if self.training and self.cfg["concept_train_labels"] == "image" \
            else "concept_labels"
        if key not in captions:
            raise KeyError(f"SMFEA with beta_c > 0 needs captions[{key!r}] (concepts.h5)")
        return captions[key]

    def _captions(self, captions: Batch) -> tuple[torch.Tensor, ...]:
        """→ (S^F, entity logits, relation logits, S^C, concept scores q), as :meth:`_images`."""
        w = self.txt_enc(captions["tokens"], captions["lengths"])
        sd = attention_pool(w, captions["lengths"], self.cfg["pool_scaled"])
        st, ent, rel = self.txt_tree(sd) if self.use_trees else (None, None, None)
        sc, q = self.cac.encode_textual(sd, self._concept_labels(captions).to(sd.device)) if self.use_concepts \
            else (None, None)
        return self._fuse(sd, st, sc), ent, rel, sc, q

    def encode_images(self, images: Batch) -> torch.Tensor:
        return self._images(images)[0]

    def encode_captions(self, captions: Batch) -> torch.Tensor:
        return self._captions(captions)[0]

    def score(self, img: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
        return img @ cap.t()  # cosine: both sides are unit vectors

    # -- loss (eq. 20) --------------------------------------------------------------------------
    def loss(self, images: Batch, captions: Batch, criterion: nn.Module) -> tuple[torch.Tensor, dict[str, float]]:
        vf, v_ent, v_rel, vc, log_p = self._images(images)
        sf, s_ent, s_rel, sc, q = self._captions(captions)
        rank = criterion(vf @ sf.t())
        logs = {"rank_loss": float(rank.detach())}
        total = rank
        c = self.cfg
        if self.use_concepts:
            if c["concept_kl_weight"] > 0:
                ckl = concept_kl(q, log_p)
                total = total + c["concept_kl_weight"] * ckl
                logs["concept_kl_loss"] = float(ckl.detach())
            if c["concept_rank_weight"] > 0:
                crank = criterion(vc @ sc.t())
                total = total + c["concept_rank_weight"] * crank
                logs["concept_rank_loss"] = float(crank.detach())
        if not self.use_trees:
            return total, logs
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
