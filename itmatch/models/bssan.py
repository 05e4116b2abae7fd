"""BSSAN: Bi-directional Spatial-Semantic Attention Networks (Huang et al., IEEE TIP 2019),
``../shared/papers/bssan.txt``.

For a pair (image i, caption with words t¹..t^L, 300-d embeddings):

- **W2R** (eq. 1–8): for each word k, bilinear tanh attention over the regions
  ``e_j^k = tanh(t_kᵀ W r_j + b)``, ``α^k = softmax_j(e^k)`` (eq. 1–2), attended region
  ``u^k = Σ_j α_j^k r_j`` (eq. 3), ``c^k = [u^k; t^k]`` → LSTM (``w2r_hidden``) over k = 1..L, the last
  state → MLP (``w2r_mlp`` hidden widths, tanh + BatchNorm) → score ``Y`` (eq. 5–6).
- **O2W** (eq. 9–17): words → bi-LSTM (``o2w_hidden``, the two directions averaged) = s^k; for each
  object j, ``e_j^k = tanh(o_jᵀ W' s^k + b')``, ``β_j = softmax_k(e_j)`` (eq. 9–10),
  ``u_j = Σ_k β_j^k s^k`` (eq. 11), ``c_j = [o_j; u_j]`` → MLP (``o2w_mlp``) → ``y'_j`` (eq. 13),
  ``Y' = mean_j y'_j`` over the objects (eq. 14).
- **Eq. 8**: during training the attention of a *negative* pair is uniform (α = 1/D over the D valid
  regions; β = 1/L over the L words, as the paper does for O2W "as Eq. (8)"); positives and every
  pair at evaluation use the softmax. Caveat (measured): the model can learn to tell uniform from
  softmax attention, a cue that does not exist at test time; on a toy set with 3-word captions O2W's
  training loss fell to 0 while test retrieval stayed at chance (``uniform_negative_attention: false``
  learned), and on the default shapes config the loss fell 17 → 0.09 in 6 epochs with test rSum 5.6
  (chance 6.4) against 227.5 with it off (README, "CAAN and BSSAN"). On the synthetic corpus of
  ``itmatch.corpus.synthetic`` both settings reach the same rSum.
- **Loss** (eq. 7, 17, 18), in :meth:`BSSAN.loss`: per image one negative caption sampled from the batch
  (a caption of another image), ``L1 = Σ_i [M - Y_i + Y_i⁻]₊``, ``L2`` the same on Y', total
  ``L1 + λ·L2 + δ·Σ‖W‖²`` (λ = 0.6, δ = 0.01). The shared ``criterion`` is not used: BSSAN has its own
  hinge (``margin``, unstated in the paper: 1.0 here, the scores being unbounded MLP outputs). The
  regulariser covers every weight matrix/tensor of θ_w2r and θ_o2w (dim ≥ 2: attention W, W', LSTMs,
  MLPs) but not biases, BatchNorm or the word embedding (GloVe, not part of θ in the paper;
  ``reg_embedding`` adds it). Because δ‖θ‖² is inside the loss, the optimizer should use **no extra
  weight decay**. The paper trains with SGD (lr 0.01, momentum 0.9): the COCO / Flickr30K recipes of the
  shared loop (``training.models.bssan.datasets``) do the same; the shapes demo keeps Adam.
- **Score** (eq. 19): ``MS = Y + λ·Y'``. Ablations: ``branches: w2r`` (BSSAN_w2r, score Y), ``o2w``
  (BSSAN_o2w, score Y'), ``delta: 0`` (BSSAN_no_reg).

Visual inputs (§IV-B) and the deviations from the paper:

- **W2R** (``w2r_input``): ``grid`` (default, as published) attends over the 14×14 VGG-19 conv5_4 grid,
  196 cells × 512 (``images["grid"]`` from ``grid.h5``, :mod:`itmatch.features.grid`); ``regions`` over all
  valid bottom-up regions of ``regions.h5`` instead (the shapes demo: no ImageNet weights offline).
- **O2W**: the paper's top 10 Faster R-CNN proposals with 4096-d fc7 features of a detector fine-tuned on
  PASCAL VOC 2007 + 2012; we have no such model and use our bottom-up-attention (BUTD, Visual Genome)
  regions: the top ``num_objects`` (P, default 10) of the 36 valid regions by ``object_conf`` (regions.h5:
  each region's highest object-class probability, background excluded), 2048-d pooled features.
- W2R cells and O2W regions are l2-normalised first (``normalize_regions``; raw bottom-up features have
  large norms that saturate the tanh attention, and so do unnormalised conv5_4 activations).
- Word embeddings (shared by the two branches) start from GloVe when ``glove`` names a GloVe text file
  (``word v1 … v300`` a line, §IV-B; vocabulary words it lacks keep the random init, the count is logged),
  and from the random init otherwise (logged). Captions are truncated to 30 words (§IV-B) by the data
  layer (``tokens.max_words``); zero padding is the batch padding, masked everywhere.
- MLP widths from Table I read as: W2R 1024 (the LSTM state) → 512 → 128 → 1; O2W [o; u] → 512 → 256 →
  64 → 1 (Table I's "512-256-64-1" has the concatenation as input). BatchNorm on the hidden layers
  (``batch_norm``); at evaluation it uses running statistics, so a pair's score is independent of the
  other pairs in the batch.

Scoring is pairwise: :meth:`score` packs ``pair_chunk`` (image, caption) pairs at a time into the batch
dimension of the LSTM / MLPs (padding handled by ``pack_padded_sequence``), no per-pair Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmatch.config import schema_defaults
from itmatch.models import glove
from itmatch.models.base import Batch, MatchingModel, chunked_pair_scores
from itmatch.models.encoders import length_mask, masked_softmax
from itmatch.text.vocab import Vocab
from itmatch.utils.logs import log

BRANCHES = ("both", "w2r", "o2w")
W2R_INPUTS = ("grid", "regions")


class MLPScore(nn.Module):
    """in → hidden[0] → … → hidden[-1] → 1, each hidden layer Linear (+ BatchNorm) + tanh. x [N, in] → [N].

    The output layer has no bias: a constant added to every score cancels in the hinge losses (its
    gradient would be exactly zero) and changes no ranking."""

    def __init__(self, in_dim: int, hidden: Sequence[int], batch_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers.append(nn.Linear(in_dim, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.Tanh())
            in_dim = h
        layers.append(nn.Linear(in_dim, 1, bias=False))  # a constant offset cancels in the ranking loss
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def attention_weights(logits: torch.Tensor, mask: torch.Tensor, uniform: torch.Tensor | None) -> torch.Tensor:
    """Softmax of ``logits`` [..., K] over K; ``mask`` (bool, broadcastable to logits; False = padding);
    where ``uniform`` (bool, broadcastable to logits[..., :1]) is set, 1/(number of valid positions)
    instead (eq. 8)."""
    mask = mask.expand_as(logits)
    soft = masked_softmax(logits, mask)
    if uniform is None or not bool(uniform.any()):
        return soft
    flat = mask.to(logits.dtype) / mask.sum(-1, keepdim=True).clamp(min=1)
    return torch.where(uniform, flat, soft)


def pair_rows(t: torch.Tensor, cidx: torch.Tensor | None, groups: int) -> torch.Tensor:
    """Caption rows of the pairs: ``t`` [C, ...] → t[cidx] [G, K, ...]; with ``cidx`` None (each of the
    ``groups`` images with every caption) the view t[None] expanded to [G, C, ...], no copy."""
    return t[cidx] if cidx is not None else t.unsqueeze(0).expand(groups, *t.shape)


def lstm_last_state(gx: torch.Tensor, lengths: torch.Tensor, lstm: nn.LSTM) -> torch.Tensor:
    """Final hidden state of a 1-layer unidirectional ``lstm`` run over sequences whose input
    projections ``W_ih x_t + b_ih + b_hh`` are given: gx [N, L, 4H], lengths [N] → h [N, H] (the state
    after each sequence's last valid step; PyTorch's gate order i, f, g, o)."""
    N, L, _ = gx.shape
    H = lstm.hidden_size
    h = gx.new_zeros(N, H)
    c = gx.new_zeros(N, H)
    w_hh = lstm.weight_hh_l0.t()
    for t in range(min(L, int(lengths.max()))):
        i, f, g, o = (gx[:, t] + h @ w_hh).chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        live = (t < lengths).unsqueeze(1)
        h, c = torch.where(live, h_new, h), torch.where(live, c_new, c)
    return h


def load_glove(path: str | Path, words: Sequence[str], weight: torch.Tensor) -> int:
    """BSSAN's word embeddings from GloVe (:func:`itmatch.models.glove.load_glove`, errors naming
    ``models.bssan.glove`` / ``models.bssan.word_dim``)."""
    return glove.load_glove(path, words, weight, "models.bssan.glove", "models.bssan.word_dim")


class BSSAN(MatchingModel):
    requires = frozenset()

    def __init__(self, vocab_size: int, feature_dim: int, word_dim: int = 300, w2r_hidden: int = 1024,
                 w2r_mlp: Sequence[int] = (512, 128), o2w_hidden: int = 512, o2w_mlp: Sequence[int] = (512, 256, 64),
                 num_objects: int = 10, lam: float = 0.6, delta: float = 0.01, margin: float = 1.0,
                 branches: str = "both", batch_norm: bool = True, normalize_regions: bool = True,
                 uniform_negative_attention: bool = True, reg_embedding: bool = False, pair_chunk: int = 256,
                 glove: str | None = None, w2r_input: str = "grid", grid_dim: int | None = None):
        """``feature_dim``: the region features' D (O2W, and W2R with ``w2r_input: regions``); ``grid_dim``:
        the grid cells' C (512), needed for W2R with ``w2r_input: grid``."""
        super().__init__()
        self.glove = glove
        if branches not in BRANCHES:
            raise ValueError(f"models.bssan.branches must be one of {BRANCHES}, got {branches!r}")
        if w2r_input not in W2R_INPUTS:
            raise ValueError(f"models.bssan.w2r_input must be one of {W2R_INPUTS}, got {w2r_input!r}")
        if num_objects < 1 or pair_chunk < 1:
            raise ValueError(f"models.bssan.num_objects and pair_chunk must be >= 1, got {num_objects}, {pair_chunk}")
        if not o2w_mlp:
            raise ValueError("models.bssan.o2w_mlp needs at least one hidden layer")
        self.use_w2r = branches in ("both", "w2r")
        self.use_o2w = branches in ("both", "o2w")
        self.w2r_input = w2r_input
        if self.use_w2r and w2r_input == "grid" and not grid_dim:
            raise ValueError("models.bssan.w2r_input is 'grid' but no grid_dim was given (grid.h5's feature "
                             "dimension, 512 for VGG-19 conv5_4)")
        self.num_objects = num_objects
        self.lam, self.delta, self.margin = lam, delta, margin
        self.normalize_regions = normalize_regions
        self.uniform_negative_attention = uniform_negative_attention
        self.reg_embedding = reg_embedding
        self.pair_chunk = pair_chunk
        self.feature_dim = feature_dim
        self.w2r_dim = int(grid_dim) if w2r_input == "grid" and grid_dim else feature_dim   # M of W2R
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        E, M = word_dim, feature_dim
        if self.use_w2r:
            M = self.w2r_dim
            self.w2r_W = nn.Parameter(torch.empty(E, M))                  # eq. 2
            nn.init.xavier_uniform_(self.w2r_W)
            self.w2r_b = nn.Parameter(torch.zeros(()))
            self.w2r_lstm = nn.LSTM(M + E, w2r_hidden, batch_first=True)   # eq. 5, input c^k = [u^k; t^k]
            self.w2r_mlp = MLPScore(w2r_hidden, w2r_mlp, batch_norm)
        if self.use_o2w:
            M = feature_dim
            self.o2w_lstm = nn.LSTM(E, o2w_hidden, batch_first=True, bidirectional=True)
            self.o2w_hidden = o2w_hidden
            self.o2w_W = nn.Parameter(torch.empty(M, o2w_hidden))         # eq. 10
            nn.init.xavier_uniform_(self.o2w_W)
            self.o2w_b = nn.Parameter(torch.zeros(()))
            self.o2w_mlp = MLPScore(M + o2w_hidden, o2w_mlp, batch_norm)   # eq. 13, input c_j = [o_j; u_j]

    @classmethod
    def inputs(cls, cfg: dict[str, Any]) -> frozenset[str]:
        """``grid`` (grid.h5) when W2R is on and attends over the grid; ``objects`` (the detector's object
        confidences in regions.h5, which pick O2W's top regions) when O2W is on: features imported without tags
        (SCAN's .npy) cannot serve O2W."""
        c = {**schema_defaults("models.bssan"), **cfg}
        need = set()
        if c["w2r_input"] == "grid" and c["branches"] in ("both", "w2r"):
            need.add("grid")
        if c["branches"] in ("both", "o2w"):
            need.add("objects")
        return frozenset(need)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], data_info: dict[str, Any]) -> BSSAN:
        keys = ("word_dim", "w2r_hidden", "w2r_mlp", "o2w_hidden", "o2w_mlp", "num_objects", "lam", "delta",
                "margin", "branches", "batch_norm", "normalize_regions", "uniform_negative_attention",
                "reg_embedding", "pair_chunk", "glove", "w2r_input")
        grid_dim = None
        if "grid" in cls.inputs(cfg):
            if "grid_dim" not in data_info:
                raise KeyError("BSSAN with models.bssan.w2r_input: grid needs data_info['grid_dim'] (grid.h5)")
            grid_dim = int(data_info["grid_dim"])
        return cls(vocab_size=int(data_info["vocab_size"]), feature_dim=int(data_info["feature_dim"]),
                   grid_dim=grid_dim, **{k: cfg[k] for k in keys if k in cfg})

    def prepare_training(self, corpus: Any) -> None:
        """Word vectors from GloVe (``glove``: a path) or the random init (``glove`` unset), logged."""
        if self.glove is None:
            log.info("BSSAN word vectors: random init (models.bssan.glove is not set)")
            return
        words = Vocab.load(corpus.paths.vocab).idx2word
        found = load_glove(self.glove, words, self.embed.weight)
        log.info("BSSAN word vectors: %d of %d vocabulary words from GloVe %s (the rest: random init)", found,
                 len(words), self.glove)

    # ---- encoders: everything that depends on one modality only ----
    def _regions(self, images: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The bottom-up regions [I, n, D] (l2-normalised with ``normalize_regions``, padding zero) and their mask."""
        R = images["features"]                                              # [I, n, D]
        if self.normalize_regions:
            R = F.normalize(R, dim=-1)
        mask = length_mask(images["num_regions"], R.shape[1])               # [I, n]
        return R * mask.unsqueeze(-1).to(R.dtype), mask

    def _grid(self, images: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv5_4 grid [I, G, C] (l2-normalised with ``normalize_regions``) and its mask (every cell valid)."""
        if "grid" not in images:
            raise KeyError("BSSAN with models.bssan.w2r_input: grid needs images['grid'] (grid.h5)")
        V = images["grid"].float()                                          # [I, 196, 512]
        if self.normalize_regions:
            V = F.normalize(V, dim=-1)
        return V, torch.ones(V.shape[:2], dtype=torch.bool, device=V.device)

    def select_objects(self, R: torch.Tensor, mask: torch.Tensor, conf: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """O2W's objects: the top ``num_objects`` valid regions by detection confidence (``object_conf``), in
        descending order: R [I, n, D], mask [I, n], conf [I, n] → (O [I, P, D], valid [I, P])."""
        P = min(self.num_objects, R.shape[1])
        top = conf.float().masked_fill(~mask, float("-inf")).topk(P, dim=1).indices   # [I, P]
        return R.gather(1, top.unsqueeze(-1).expand(-1, -1, R.shape[2])), mask.gather(1, top)

    def encode_images(self, images: Batch) -> dict[str, torch.Tensor]:
        R, mask = self._regions(images)
        V, vmask = self._grid(images) if self.use_w2r and self.w2r_input == "grid" else (R, mask)
        out = {"R": V, "mask": vmask}                                       # W2R's regions (grid cells or regions)
        if self.use_w2r:
            out["RW"] = V @ self.w2r_W.t()                                  # [I, n, E]: W r_j
        if self.use_o2w:                                                    # top-P regions by object_conf
            if "object_conf" not in images:
                raise KeyError("BSSAN needs images['object_conf'] to pick its O2W objects (regions.h5 object_conf)")
            O, omask = self.select_objects(R, mask, images["object_conf"])  # [I, P, D], [I, P]
            first = self.o2w_mlp.net[0]                                     # MLP layer 1 on [o; u], o part
            out["O"] = O
            out["omask"] = omask
            out["OW"] = O @ self.o2w_W                                      # [I, P, B]: oᵀ W'
            out["O1"] = O @ first.weight[:, : self.feature_dim].t() + first.bias   # [I, P, h1]
        return out

    def encode_captions(self, captions: Batch) -> dict[str, torch.Tensor]:
        tokens, lengths = captions["tokens"], captions["lengths"]
        T = self.embed(tokens)                                              # [C, L, E]
        mask = length_mask(lengths, tokens.shape[1])                        # [C, L]
        out = {"T": T, "lengths": lengths, "mask": mask}
        if self.use_o2w:
            packed = pack_padded_sequence(T, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
            S, _ = self.o2w_lstm(packed)
            S, _ = pad_packed_sequence(S, batch_first=True, total_length=tokens.shape[1])
            S = (S[..., : self.o2w_hidden] + S[..., self.o2w_hidden:]) / 2  # averaged directions
            S = S * mask.unsqueeze(-1).to(S.dtype)                          # [C, L, B]
            out["S"] = S
            out["S1"] = S @ self.o2w_mlp.net[0].weight[:, self.feature_dim:].t()  # [C, L, h1]: u part
        return out

    # The W2R LSTM's input projection is linear, so W_ih [u^k; t^k] = Σ_j α_j^k (W_ih,r r_j) + W_ih,t t^k:
    # the region and word halves are projected once per image / caption ("RP", "TP"), and a pair only
    # mixes them with its attention (cost n·4H instead of M·4H per word).
    def _with_region_proj(self, img: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.use_w2r or "RP" in img:
            return img
        return {**img, "RP": img["R"] @ self.w2r_lstm.weight_ih_l0[:, : self.w2r_dim].t()}   # [I, n, 4H]

    def _with_word_proj(self, cap: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.use_w2r or "TP" in cap:
            return cap
        lstm = self.w2r_lstm
        tp = cap["T"] @ lstm.weight_ih_l0[:, self.w2r_dim:].t() + lstm.bias_ih_l0 + lstm.bias_hh_l0
        return {**cap, "TP": tp}                                            # [C, L, 4H]

    # ---- the two branches on groups of pairs: image g with captions cidx[g, k] (cidx None: with every caption) ----
    def w2r_attention(self, img: dict, cap: dict, cidx: torch.Tensor | None, uniform: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """α [G, K, L, n] (eq. 1–2; eq. 8 where ``uniform`` [G, K])."""
        G = img["mask"].shape[0]
        e = torch.tanh(torch.einsum("gkle,gne->gkln", pair_rows(cap["T"], cidx, G), img["RW"]) + self.w2r_b)
        u = None if uniform is None else uniform[:, :, None, None]
        return attention_weights(e, img["mask"][:, None, None, :], u)

    def o2w_attention(self, img: dict, cap: dict, cidx: torch.Tensor | None, uniform: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """β [G, K, P, L] (eq. 9–10; eq. 8 where ``uniform`` [G, K])."""
        G = img["mask"].shape[0]
        e = torch.tanh(torch.einsum("gpb,gklb->gkpl", img["OW"], pair_rows(cap["S"], cidx, G)) + self.o2w_b)
        u = None if uniform is None else uniform[:, :, None, None]
        return attention_weights(e, pair_rows(cap["mask"], cidx, G)[:, :, None, :], u)

    def w2r_score(self, img: dict, cap: dict, cidx: torch.Tensor | None, uniform: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Y [G, K] (eq. 3–6): LSTM over c^k = [Σ_j α_j^k r_j; t^k], last state → MLP."""
        img, cap = self._with_region_proj(img), self._with_word_proj(cap)
        alpha = self.w2r_attention(img, cap, cidx, uniform)                 # [G, K, L, n]
        G, K, L, n = alpha.shape
        gx = (alpha.reshape(G, K * L, n) @ img["RP"]).view(G, K, L, -1) + pair_rows(cap["TP"], cidx, G)  # [G,K,L,4H]
        h = lstm_last_state(gx.view(G * K, L, -1), pair_rows(cap["lengths"], cidx, G).reshape(-1), self.w2r_lstm)
        return self.w2r_mlp(h).view(G, K)

    def o2w_score(self, img: dict, cap: dict, cidx: torch.Tensor | None, uniform: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Y' [G, K] (eq. 11–16): per object MLP([o_j; Σ_k β_j^k s^k]), averaged over the valid objects."""
        beta = self.o2w_attention(img, cap, cidx, uniform)                  # [G, K, P, L]
        G, K, P, L = beta.shape
        h1 = img["O1"][:, None] + torch.einsum("gkpl,gklh->gkph", beta, pair_rows(cap["S1"], cidx, G))  # [G,K,P,h1]
        valid = img["omask"][:, None, :].expand(G, K, P)                    # [G, K, P]
        y = h1.new_zeros(G, K, P)
        y[valid] = self.o2w_mlp.net[1:](h1[valid]).squeeze(-1)              # padding objects stay out of BN
        vf = valid.to(y.dtype)
        return (y * vf).sum(-1) / vf.sum(-1).clamp(min=1)                   # eq. 14

    def grouped_scores(self, img: dict, cap: dict, cidx: torch.Tensor | None, uniform: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(Y, Y') [G, K] for the pairs (image g of ``img``, caption cidx[g, k] of ``cap``)."""
        y = self.w2r_score(img, cap, cidx, uniform) if self.use_w2r else None
        y2 = self.o2w_score(img, cap, cidx, uniform) if self.use_o2w else None
        return y, y2

    def pair_scores(self, img: dict, cap: dict, ii: torch.Tensor, cc: torch.Tensor,
                    uniform: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(Y, Y') [N] for a list of pairs (image ii[k], caption cc[k])."""
        sub = {k: v[ii] for k, v in img.items()}
        y, y2 = self.grouped_scores(sub, cap, cc[:, None], None if uniform is None else uniform[:, None])
        return (None if y is None else y[:, 0]), (None if y2 is None else y2[:, 0])

    def combine(self, y: torch.Tensor | None, y2: torch.Tensor | None) -> torch.Tensor:
        """Eq. 19: MS = Y + λ Y' (a single branch alone when the other is ablated)."""
        if y is None:
            return y2
        if y2 is None:
            return y
        return y + self.lam * y2

    def score(self, img: dict[str, torch.Tensor], cap: dict[str, torch.Tensor]) -> torch.Tensor:
        """[I, C]: blocks of ≤ ``pair_chunk`` pairs, each one batched LSTM / MLP pass."""
        def block_fn(sub: dict, block: dict) -> torch.Tensor:   # cidx None: every image × every caption (views)
            return self.combine(*self.grouped_scores(sub, block, None))

        return chunked_pair_scores(img, self._with_word_proj(cap), self.pair_chunk, block_fn,
                                   prep_img=self._with_region_proj)

    # ---- training ----
    def sample_negatives(self, images: Batch, captions: Batch) -> torch.Tensor:
        """For each image i of the aligned batch, a random caption index j ≠ i, of another image when
        ``image_index`` / ``index`` tell which captions describe the same image."""
        B = captions["lengths"].shape[0]
        device = captions["lengths"].device
        same = torch.eye(B, dtype=torch.bool, device=device)
        if "image_index" in captions and "index" in images:
            same_img = images["index"][:, None] == captions["image_index"][None, :]
            if bool((~(same | same_img)).any(1).all()):
                same = same | same_img
        r = torch.rand(B, B).to(device).masked_fill(same, -1.0)  # CPU generator: the same negatives on any device
        return r.argmax(1)

    def regularized_parameters(self) -> list[nn.Parameter]:
        """The weights δ‖θ‖² applies to: every parameter of dim ≥ 2 (embedding only with ``reg_embedding``)."""
        return [p for n, p in self.named_parameters()
                if p.requires_grad and p.dim() >= 2 and (self.reg_embedding or not n.startswith("embed."))]

    def loss(self, images: Batch, captions: Batch, criterion: nn.Module) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. 18 on an aligned batch (``criterion`` unused; see the module docstring)."""
        B = captions["lengths"].shape[0]
        if B < 2:
            raise ValueError("BSSAN's loss needs a batch of at least 2 pairs (a negative caption per image)")
        img, cap = self.encode_images(images), self.encode_captions(captions)
        ar = torch.arange(B, device=captions["lengths"].device)
        cidx = torch.stack([ar, self.sample_negatives(images, captions)], dim=1)   # [B, 2]: positive, negative
        uniform = torch.tensor([False, True], device=ar.device).expand(B, 2)
        y, y2 = self.grouped_scores(img, cap, cidx, uniform if self.uniform_negative_attention else None)
        total = torch.zeros((), device=ar.device)
        stats: dict[str, float] = {}
        if y is not None:
            l1 = (self.margin - y[:, 0] + y[:, 1]).clamp(min=0).sum()           # eq. 7
            total = total + l1
            stats["w2r_loss"] = float(l1.detach())
        if y2 is not None:
            l2 = (self.margin - y2[:, 0] + y2[:, 1]).clamp(min=0).sum()         # eq. 17
            total = total + (self.lam if y is not None else 1.0) * l2
            stats["o2w_loss"] = float(l2.detach())
        stats["rank_loss"] = float(total.detach())
        if self.delta:
            reg = sum(p.pow(2).sum() for p in self.regularized_parameters())
            total = total + self.delta * reg
            stats["reg_loss"] = float(reg.detach())
        return total, stats
