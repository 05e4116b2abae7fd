"""CAAN: Context-Aware Attention Network (Zhang et al., CVPR 2020), ``../shared/papers/caan.txt``.

Fragments (§3.1–3.2): regions ``v_i = W_x x_i + b`` (eq. 1, :class:`RegionEncoder`), words = 300-d
embedding → bi-GRU, directions averaged (eq. 2–4, :class:`GRUTextEncoder`), both D-dimensional.
For a pair (V [n, D] regions, U [m, D] words)::

    H    = tanh(V K Uᵀ)                                   [n, m]   eq. 7 (rows = regions)
    Huv  = [H]₊ / ‖[H]₊‖ over regions (each column)       [n, m]   eq. 12  (word-to-region)
    Hvu  = [H]₊ / ‖[H]₊‖ over words (each row)            [n, m]   eq. 13  (region-to-word)
    FA:  Hv = V M1 Vᵀ, Hu = U M2 Uᵀ                                  eq. 14–15
    SA:  Hv = cos-sim of the rows of Huv        [n, n]              eq. 16
         Hu = cos-sim of the columns of Hvu     [m, m]              eq. 17
    f    = softmax_n(tanh(Hv V Q1 + Huv U Q2) Wv)         [n]      eq. 8–9
    g    = softmax_m(tanh(Hu U Q3 + Hvuᵀ V Q4) Wu)        [m]      eq. 10–11 (Hvu transposed so the
                                                                   product is [m, n]·[n, D])
    v̂ = Σ f_i v_i,  û = Σ g_j u_j,  S = ⟨v̂, û⟩                      eq. 5–6; loss eq. 19 (hardest
                                                                   negatives, the shared ContrastiveLoss)

Ablations (Table 4) through ``inter_attention`` (IA: the Huv / Hvu terms) and ``intra_attention``
(none | fa | sa: the Hv / Hu terms):

    baseline   inter false, intra none   v̂, û = mean of the fragments
    +IA        inter true,  intra none
    +FA        inter false, intra fa     (pair-independent: scored as a matrix product)
    +SA        inter false, intra sa
    +IA+FA     inter true,  intra fa
    CAAN       inter true,  intra sa     (default)

Choices where the paper is silent (all in ``config.yaml`` → ``models.caan``):

- D = ``embed_dim`` = 768 and z = ``attn_dim`` = 512, chosen so that the model has the size §4.4 states
  ("ViLBERT has parameters of 275 M, while ours is only 11 M"). Everything else is fixed by the paper:
  300-d word embedding (§3.2), a one-layer bi-GRU with D hidden units per direction, averaged (eq. 2–4),
  FC 2048 → D (eq. 1), K ∈ R^{D×D} (eq. 7), Q1..Q4 ∈ R^{D×z} and Wv, Wu ∈ R^z (eq. 8–11). Trainable
  parameters with the Flickr30K vocabulary of 8,481 words (SCAN's, as SMFEA §4.2 counts it)::

      word embedding 8,481 × 300           2,544,300
      region FC 2048 × 768 + 768           1,573,632
      bi-GRU 300 → 768, 2 directions       4,930,560
      K 768 × 768                            589,824
      Q1..Q4 4 × 768 × 512                 1,572,864
      Wv, Wu 2 × 512                           1,024
      total                               11,212,204  (≈ 11 M; COCO's 11,353 words: 12,073,804)

  The earlier D = 1024, z = 256 (SCAN's D) gave 14,887,084: with D = 1024 the GRU alone has 8.1 M and
  the total is ≥ 13.8 M for any z, so the paper's D must be smaller than 1024 (the paper does not state
  D or z; the FA variant adds M1, M2 ∈ R^{D×D}, not part of the 11 M model, which uses SA).
- Fragments are l2-normalised after eq. 1 / eq. 4 (``normalize_fragments``, as SCAN's encoders) and
  v̂, û before the inner product (``normalize_embeddings``), so S is a cosine in [-1, 1] that suits the
  margin of the ranking loss; set both false for the literal un-normalised eq. 1 / inner product.
- K, Q1..Q4 Xavier-uniform, Wv, Wu uniform(±1/√z), M1 = M2 = identity at start (the paper notes that
  identity gives dot-product similarities).
- The padding of variable-length captions / region sets is masked out of H (so out of every
  normalisation) and out of the softmaxes of eq. 9 and 11.

Scoring is pairwise (the attention depends on the pair): :meth:`score` evaluates all I×C pairs with
batched tensor ops, ``pair_chunk`` pairs at a time (memory ≈ pair_chunk · n · z floats per
intermediate); under autograd each chunk is checkpointed (``checkpoint``) so training memory stays
bounded too.

Training (read by the shared loop from ``training.models.caan``, not by this module): §4.2 uses Adam,
Flickr30K lr 2e-4 for 15 epochs then 2e-5 for 15, COCO 5e-4 for 10 then ×0.1 for 10, best model by
val rSum; the loss is the default (shared ``ContrastiveLoss``, hardest negatives, eq. 19).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from itmatch.models.base import Batch, MatchingModel, chunked_pair_scores
from itmatch.models.encoders import GRUTextEncoder, RegionEncoder, length_mask, masked_mean, masked_softmax

INTRA_CHOICES = ("none", "fa", "sa")


def inter_attention(H: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 12–13 on H [..., n, m] (regions × words): clip at 0, then l2-normalise each column over the
    regions (Huv) and each row over the words (Hvu). Returns (Huv, Hvu), both [..., n, m]."""
    Hp = H.clamp(min=0)
    return F.normalize(Hp, dim=-2, eps=eps), F.normalize(Hp, dim=-1, eps=eps)


def semantic_intra_attention(Huv: torch.Tensor, Hvu: torch.Tensor, eps: float = 1e-8
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 16–17: Hv [..., n, n] = cosine similarities of the rows of Huv (region response vectors),
    Hu [..., m, m] = cosine similarities of the columns of Hvu (word response vectors)."""
    rows = F.normalize(Huv, dim=-1, eps=eps)   # [..., n, m]
    cols = F.normalize(Hvu, dim=-2, eps=eps)   # [..., n, m]
    return rows @ rows.transpose(-1, -2), cols.transpose(-1, -2) @ cols


def _per_image(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """A [I, C, p, q] @ X [I, q, z] → [I, C, p, z] as one bmm over images (no broadcast copy of X)."""
    I, C, p, q = A.shape
    return (A.reshape(I, C * p, q) @ X).view(I, C, p, X.shape[-1])


def _per_caption(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """A [I, C, p, q] @ X [C, q, z] → [I, C, p, z] (a permuted view) as one bmm over captions."""
    I, C, p, q = A.shape
    out = A.transpose(0, 1).reshape(C, I * p, q) @ X                    # [C, I·p, z]
    return out.view(C, I, p, X.shape[-1]).transpose(0, 1)


class CAAN(MatchingModel):
    requires = frozenset()

    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int = 768, word_dim: int = 300,
                 attn_dim: int = 512, inter_attention: bool = True, intra_attention: str = "sa",
                 normalize_fragments: bool = True, normalize_embeddings: bool = True,
                 pair_chunk: int = 4096, checkpoint: bool = True):
        super().__init__()
        if intra_attention not in INTRA_CHOICES:
            raise ValueError(f"models.caan.intra_attention must be one of {INTRA_CHOICES}, got {intra_attention!r}")
        if pair_chunk < 1:
            raise ValueError(f"models.caan.pair_chunk must be >= 1, got {pair_chunk}")
        self.inter = bool(inter_attention)
        self.intra = intra_attention
        self.normalize_embeddings = normalize_embeddings
        self.pair_chunk = pair_chunk
        self.checkpoint = checkpoint
        # l2-normalisation here with F.normalize (finite gradient on the all-zero padding rows)
        self.normalize_fragments = normalize_fragments
        self.img_enc = RegionEncoder(feature_dim, embed_dim, normalize=False)
        self.txt_enc = GRUTextEncoder(vocab_size, embed_dim, word_dim, normalize=normalize_fragments)
        d, z = embed_dim, attn_dim

        def mat(rows: int, cols: int) -> nn.Parameter:
            w = torch.empty(rows, cols)
            nn.init.xavier_uniform_(w)
            return nn.Parameter(w)

        def vec(n: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(n).uniform_(-1 / math.sqrt(n), 1 / math.sqrt(n)))

        self.attentive = self.inter or self.intra != "none"
        if self.attentive:
            self.Wv, self.Wu = vec(z), vec(z)                    # eq. 9, 11
        if self.inter or self.intra == "sa":
            self.K = mat(d, d)                                   # eq. 7
        if self.intra != "none":
            self.Q1, self.Q3 = mat(d, z), mat(d, z)              # eq. 8, 10 (intra terms)
        if self.intra == "fa":
            self.M1 = nn.Parameter(torch.eye(d))                 # eq. 14
            self.M2 = nn.Parameter(torch.eye(d))                 # eq. 15
        if self.inter:
            self.Q2, self.Q4 = mat(d, z), mat(d, z)              # eq. 8, 10 (inter terms)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], data_info: dict[str, Any]) -> CAAN:
        keys = ("embed_dim", "word_dim", "attn_dim", "inter_attention", "intra_attention",
                "normalize_fragments", "normalize_embeddings", "pair_chunk", "checkpoint")
        return cls(vocab_size=int(data_info["vocab_size"]), feature_dim=int(data_info["feature_dim"]),
                   **{k: cfg[k] for k in keys if k in cfg})

    @property
    def pairwise(self) -> bool:
        """Whether the score depends on the pair (else v̂, û are computed per modality)."""
        return self.inter or self.intra == "sa"

    # ---- encoders: fragments plus every per-modality product, so pairs only do pair work ----
    def encode_images(self, images: Batch) -> dict[str, torch.Tensor]:
        V = self.img_enc(images["features"], images["num_regions"])        # [I, n, d]
        if self.normalize_fragments:
            V = F.normalize(V, dim=-1)                                      # padding rows stay 0
        mask = length_mask(images["num_regions"], V.shape[1])               # [I, n]
        out = {"V": V, "mask": mask}
        if self.intra == "fa":                                              # Hv V Q1, pair-independent
            Hv = V @ self.M1 @ V.transpose(1, 2)                            # [I, n, n]
            out["intra"] = Hv @ (V @ self.Q1)                               # [I, n, z]
        elif self.intra == "sa":
            out["VQ1"] = V @ self.Q1                                        # [I, n, z]
        if self.inter or self.intra == "sa":
            out["VK"] = V @ self.K                                          # [I, n, d]
        if self.inter:
            out["VQ4"] = V @ self.Q4                                        # [I, n, z]
        if not self.pairwise:
            out["emb"] = self._pool(V, mask, out.get("intra"), self.Wv if self.attentive else None)
        return out

    def encode_captions(self, captions: Batch) -> dict[str, torch.Tensor]:
        U = self.txt_enc(captions["tokens"], captions["lengths"])           # [C, m, d]
        mask = length_mask(captions["lengths"], U.shape[1])                 # [C, m]
        out = {"U": U, "mask": mask}
        if self.intra == "fa":
            Hu = U @ self.M2 @ U.transpose(1, 2)                            # [C, m, m]
            out["intra"] = Hu @ (U @ self.Q3)                               # [C, m, z]
        elif self.intra == "sa":
            out["UQ3"] = U @ self.Q3
        if self.inter:
            out["UQ2"] = U @ self.Q2
        if not self.pairwise:
            out["emb"] = self._pool(U, mask, out.get("intra"), self.Wu if self.attentive else None)
        return out

    def _pool(self, X: torch.Tensor, mask: torch.Tensor, pre: torch.Tensor | None,
              w: torch.Tensor | None) -> torch.Tensor:
        """Pair-independent attention (baseline: masked mean; +FA: eq. 8–9 with the intra term only)."""
        if w is None:
            e = masked_mean(X, mask)
        else:
            a = masked_softmax(torch.tanh(pre) @ w, mask)                   # [B, L]
            e = (a.unsqueeze(-1) * X).sum(1)
        return F.normalize(e, dim=-1) if self.normalize_embeddings else e

    # ---- pairwise scoring ----
    def attend(self, img: dict[str, torch.Tensor], cap: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention weights of every pair: f [I, C, n] over regions, g [I, C, m] over words."""
        vm, um = img["mask"], cap["mask"]                                    # [I, n], [C, m]
        pm = vm[:, None, :, None] & um[None, :, None, :]                     # [I, C, n, m]
        H = torch.tanh(torch.einsum("ind,cmd->icnm", img["VK"], cap["U"])) * pm.to(img["V"].dtype)
        Huv, Hvu = inter_attention(H)
        f_pre: torch.Tensor | float = 0.0
        g_pre: torch.Tensor | float = 0.0
        if self.intra == "sa":
            Hv, Hu = semantic_intra_attention(Huv, Hvu)
            f_pre = _per_image(Hv, img["VQ1"])                               # Hv V Q1     [I, C, n, z]
            g_pre = _per_caption(Hu, cap["UQ3"])                             # Hu U Q3     [I, C, m, z]
        elif self.intra == "fa":
            f_pre = img["intra"][:, None]                                    # [I, 1, n, z]
            g_pre = cap["intra"][None]                                       # [1, C, m, z]
        if self.inter:
            f_pre = f_pre + _per_caption(Huv, cap["UQ2"])                    # Huv U Q2    [I, C, n, z]
            g_pre = g_pre + _per_image(Hvu.transpose(-1, -2), img["VQ4"])    # Hvuᵀ V Q4   [I, C, m, z]
        f = masked_softmax(torch.tanh(f_pre) @ self.Wv, vm[:, None, :])      # [I, C, n]
        g = masked_softmax(torch.tanh(g_pre) @ self.Wu, um[None, :, :])      # [I, C, m]
        return f, g

    def _pair_scores(self, img: dict[str, torch.Tensor], cap: dict[str, torch.Tensor]) -> torch.Tensor:
        f, g = self.attend(img, cap)
        v_hat = torch.einsum("icn,ind->icd", f, img["V"])                   # eq. 5
        u_hat = torch.einsum("icm,cmd->icd", g, cap["U"])                   # eq. 6
        if self.normalize_embeddings:
            v_hat, u_hat = F.normalize(v_hat, dim=-1), F.normalize(u_hat, dim=-1)
        return (v_hat * u_hat).sum(-1)                                      # [I, C]

    def score(self, img: dict[str, torch.Tensor], cap: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.pairwise:
            return img["emb"] @ cap["emb"].t()
        block_fn = self._pair_scores
        if self.checkpoint and torch.is_grad_enabled():
            block_fn = partial(torch_checkpoint, self._pair_scores, use_reentrant=False)
        return chunked_pair_scores(img, cap, self.pair_chunk, block_fn)
