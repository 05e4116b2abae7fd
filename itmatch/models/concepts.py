"""Consensus-aware concept (CAC) representations of CVSE (Wang et al., ECCV 2020), SMFEA's V^C / S^C (§3.2.3).

Read from CVSE's released code (github.com/BruceW91/CVSE, commit 94c2191; read, not copied), with its
default settings (train_f30k.py: ``--use_BatchNorm`` on, ``--activation_type tanh``, ``--embed_size 1024``,
``--input_channel 300``, ``--Concept_label_ratio 0.35``, ``--feature_fuse_type weight_sum``):

- **Concept graph** (util/C_GCN.py ``C_GCN``): concept word vectors X [K, concept_dim] (GloVe, fixed inputs:
  data.py lines 104–105, 173; here a buffer, or a parameter with ``train_concept_embeddings``) through two
  graph convolutions ``Â (X W)`` without bias (``GraphConvolution``, lines 17–69; weights U(±1/√out),
  lines 32–34), concept_dim → D/2 → LeakyReLU(0.2) → D (lines 79–81, 116–118), each concept l2-normalised
  (line 121). Â = D^(−1/2) Aᵀ D^(−1/2), D the row sums of the correlation matrix A of ``concepts.h5``
  (util/util_C_GCN.py ``gen_adj``, lines 128–132; A is fixed: CVSE detaches it, C_GCN.py lines 107–109).
- **Consensus-level representation** (model_CVSE.py ``Consensus_level_feature_learning``, lines 478–585, the
  BatchNorm + tanh variant): concept scores ``a_k = w₃ · (tanh(BN(W₁ c_k)) ⊙ tanh(BN(W₂ v))) + b₃`` of an
  instance vector v (the l2-normalised V^D / S^D, as CVSE feeds its l2-normalised instance embeddings,
  lines 808–812; b₃ is left out: one constant added to every logit cancels in the softmax),
  ``p = softmax(10 · a)`` (``smooth_coef``, line 542, 563); the textual scores mix in the
  caption's concept labels y: ``q = ρ · softmax(10 · y) + (1 − ρ) · p`` (ρ = ``concept_label_ratio``, lines
  565–568); V^C = l2norm(Σ_k p_k c_k), S^C = l2norm(Σ_k q_k c_k) (lines 569–584). One module per modality
  (lines 685–688), one graph shared (line 691). The product over [B, K, D] of line 558 is computed as the
  equal matrix product ``tanh(BN(W₂ v)) (w₃ ⊙ tanh(BN(W₁ C)))ᵀ``.
- **Concept-prediction loss** (``KL_loss_softmax``, lines 635–650, used at line 845): KL(q ‖ p) = Σ q (log q −
  log p), summed over the batch and the concepts, the visual scores as the approximation; gradients reach both
  branches.
- In training the textual labels are the image's (data.py lines 268–276 read one label set per image for the
  train split, all_f30k_concept_label.json; here the union of its captions' labels), at evaluation the
  caption's own (lines 278–291); ``concept_train_labels: caption`` uses the caption's own in training too.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from itmatch.models.encoders import l2norm


def normalized_adjacency(a: torch.Tensor) -> torch.Tensor:
    """D^(−1/2) Aᵀ D^(−1/2) with D = diag(row sums of A) (CVSE util_C_GCN.py ``gen_adj``)."""
    d = a.sum(1).pow(-0.5)
    return (a * d[None, :]).t() * d[None, :]


class GraphConvolution(nn.Module):
    """``adj @ (x @ W)``, no bias (CVSE util/C_GCN.py ``GraphConvolution``, whole-graph mode)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim))
        bound = 1.0 / math.sqrt(out_dim)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return adj @ (x @ self.weight)


class ConceptGCN(nn.Module):
    """Two graph convolutions concept_dim → D/2 → D with LeakyReLU(0.2) between, rows l2-normalised."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.gc1 = GraphConvolution(in_dim, max(1, embed_dim // 2))
        self.gc2 = GraphConvolution(max(1, embed_dim // 2), embed_dim)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return l2norm(self.gc2(F.leaky_relu(self.gc1(x, adj), 0.2), adj))


class ConsensusScores(nn.Module):
    """Concept logits a [B, K] of instance vectors [B, D] against concept features [K, D] (CVSE
    ``Consensus_level_feature_learning``, BatchNorm + tanh)."""

    def __init__(self, dim: int):
        super().__init__()
        self.concept_map = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.Tanh())    # embedding_1
        self.instance_map = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.Tanh())   # embedding_2
        self.score = nn.Linear(dim, 1, bias=False)   # fc3; its bias adds one constant to every logit: no effect

    def forward(self, instance: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
        ws = self.concept_map(concepts)                          # [K, D]
        wv = _mapped(self.instance_map, instance)                # [B, D]
        return wv @ (ws * self.score.weight).t()


def _mapped(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Linear → BatchNorm → tanh; a training batch of one row (an epoch's last batch) uses the running statistics,
    which BatchNorm cannot estimate from one row."""
    if not (seq.training and x.shape[0] < 2):
        return seq(x)
    lin, bn, act = seq
    return act(F.batch_norm(lin(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))


class ConsensusConcepts(nn.Module):
    """CVSE's CAC branch: the concept graph, V^C / S^C and the concept scores of both modalities."""

    def __init__(self, n_concepts: int, embed_dim: int, concept_dim: int = 300, label_ratio: float = 0.35,
                 smooth: float = 10.0, train_embeddings: bool = False):
        super().__init__()
        if n_concepts < 2:
            raise ValueError(f"the concept graph needs at least 2 concepts, got {n_concepts} (concepts.h5)")
        self.n_concepts, self.concept_dim = n_concepts, concept_dim
        self.label_ratio, self.smooth = float(label_ratio), float(smooth)
        emb = torch.randn(n_concepts, concept_dim)   # the random init; prepare_training may load GloVe rows
        if train_embeddings:
            self.embeddings = nn.Parameter(emb)
        else:
            self.register_buffer("embeddings", emb)
        self.register_buffer("correlation", torch.eye(n_concepts))   # set from concepts.h5 (set_graph)
        self.gcn = ConceptGCN(concept_dim, embed_dim)
        self.visual = ConsensusScores(embed_dim)
        self.textual = ConsensusScores(embed_dim)

    def set_graph(self, correlation: np.ndarray | torch.Tensor, source: str = "concepts.h5") -> None:
        """Install the correlation matrix A [K, K] (``concepts.h5['correlation']``)."""
        a = torch.as_tensor(np.asarray(correlation), dtype=torch.float32)
        if a.shape != (self.n_concepts, self.n_concepts):
            raise ValueError(f"{source}: correlation has shape {tuple(a.shape)}, the model has "
                             f"{self.n_concepts} concepts ([{self.n_concepts}, {self.n_concepts}] expected)")
        if not torch.isfinite(a).all() or (a.sum(1) <= 0).any():
            raise ValueError(f"{source}: correlation must be finite with positive row sums")
        with torch.no_grad():
            self.correlation.copy_(a)

    def concept_features(self) -> torch.Tensor:
        """The GCN's concept features C [K, D], unit rows."""
        return self.gcn(self.embeddings, normalized_adjacency(self.correlation))

    def encode_visual(self, instance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """V^C [B, D] and the log concept scores log p [B, K] of instance vectors [B, D]."""
        c = self.concept_features()
        logits = self.smooth * self.visual(l2norm(instance), c)
        return l2norm(logits.softmax(-1) @ c), logits.log_softmax(-1)

    def encode_textual(self, instance: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """S^C [C, D] and the concept scores q [C, K] of instance vectors [C, D] with multi-hot labels [C, K]."""
        c = self.concept_features()
        p = (self.smooth * self.textual(l2norm(instance), c)).softmax(-1)
        q = self.label_ratio * (self.smooth * labels.to(p.dtype)).softmax(-1) + (1 - self.label_ratio) * p
        return l2norm(q @ c), q


def concept_kl(q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Σ q (log q − log p) over the batch and the concepts (CVSE ``KL_loss_softmax``: KLDivLoss(log p, q), sum)."""
    return (torch.xlogy(q, q) - q * log_p).sum()
