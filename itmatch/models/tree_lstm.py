"""SMFEA's context-aware structured tree encoder (VCS-Tree / TCS-Tree, SMFEA §3.2.2, eq. 5–14).

The referral tree has a fixed 7-node, three-layer shape, nodes numbered 1..7 in in-order traversal::

                 4            (layer 3: relation)
            2          6      (layer 2: relations)
          1   3      5   7    (layer 1: entities / fragments)

An instance-level vector x (V^D or S^D, [B, D]) is mapped by 7 linear maps into the node inputs
x_t = x W_t^o (eq. 5); the nodes are then updated bottom-up (children before parents) by

    h̃_t = Σ_{k∈T(t)} h_k                                   (children's hidden states summed)
    i_t = σ(W^i x_t + U^i h̃_t),  f_t = σ(W^f x_t + U^f h̃_t),  o_t = σ(W^o x_t + U^o h̃_t)   (6–8)
    c̃_t = tanh(W^u x_t + U^u h̃_t)                                                        (9)
    c_t = i_t ⊙ c̃_t + f_t ⊙ Σ_{k∈T(t)} (f_k ⊙ c_k)                                       (10)
    h_t = o_t ⊙ tanh(c_t)                                                                  (11)

Eq. 10 is implemented literally: the parent's forget gate f_t multiplies the sum of the children's
cells, each already scaled by the child's own forget gate f_k (a leaf has no children, so
h̃ = 0 and c = i ⊙ c̃). The paper's swapped U^f / U^i labels in eq. 6–7 are a typo without effect.
Leaves are classified into the entity dictionary, internal nodes into the relation dictionary
(eq. 12–13, the classifiers return logits; softmax is applied in the loss), and the tree embedding
is V^T = Σ_t W_t h_t with 7 separate maps back to D (eq. 14).

``structure`` selects the message-passing graph (SMFEA Table 7 ablations):
``tree`` (above), ``chain`` (a chain-structured LSTM over the nodes in order 1→7, each node's only
child being its predecessor, as the chain-based encoder), ``linear`` (no message passing: every
node sees only its own input, the "linear-based" variant).
"""

from __future__ import annotations

import torch
from torch import nn

# 0-based node positions of the entity leaves (nodes 1,3,5,7) and relation nodes (2,4,6); re-exported
from itmatch.text.trees import ENTITY_NODES, RELATION_NODES

N_NODES = 7

STRUCTURES: dict[str, dict[int, tuple[int, ...]]] = {
    # node (0-based) → children (0-based)
    "tree": {0: (), 2: (), 4: (), 6: (), 1: (0, 2), 5: (4, 6), 3: (1, 5)},
    "chain": {0: (), 1: (0,), 2: (1,), 3: (2,), 4: (3,), 5: (4,), 6: (5,)},
    "linear": {t: () for t in range(N_NODES)},
}


def evaluation_order(children: dict[int, tuple[int, ...]]) -> list[int]:
    """Nodes sorted so that every node comes after all its children."""
    order: list[int] = []
    seen: set[int] = set()

    def visit(t: int) -> None:
        if t in seen:
            return
        for k in children[t]:
            visit(k)
        seen.add(t)
        order.append(t)

    for t in sorted(children):
        visit(t)
    return order


class TreeLSTMCell(nn.Module):
    """Gates of eq. 6–11 for one node: W^* on the node input, U^* on the summed children states."""

    def __init__(self, input_dim: int, hidden_dim: int):
        super().__init__()
        self.W = nn.Linear(input_dim, 4 * hidden_dim)            # rows: i, f, o, u (bias here)
        self.U = nn.Linear(hidden_dim, 4 * hidden_dim, bias=False)
        self.hidden_dim = hidden_dim

    def forward(self, x: torch.Tensor, h_sum: torch.Tensor, fc_sum: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, in], h_sum = Σ h_k [B, h], fc_sum = Σ f_k ⊙ c_k [B, h] → (h, c, f), each [B, h]."""
        i, f, o, u = (self.W(x) + self.U(h_sum)).chunk(4, dim=-1)
        i, f, o, u = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o), torch.tanh(u)
        c = i * u + f * fc_sum
        h = o * torch.tanh(c)
        return h, c, f


class StructuredTreeEncoder(nn.Module):
    """x [B, D] → (V^T [B, D], entity logits [B, 4, n_entities], relation logits [B, 3, n_relations]).

    Entity logits are for nodes 1,3,5,7 (in that order), relation logits for nodes 2,4,6.
    """

    def __init__(self, embed_dim: int, node_input_dim: int, hidden_dim: int, n_entities: int,
                 n_relations: int, structure: str = "tree"):
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"unknown tree structure {structure!r}; known: {', '.join(STRUCTURES)}")
        self.structure = structure
        self.children_of = STRUCTURES[structure]
        self.order = evaluation_order(self.children_of)
        self.node_maps = nn.Linear(embed_dim, N_NODES * node_input_dim)   # the 7 maps W_t^o of eq. 5
        self.cell = TreeLSTMCell(node_input_dim, hidden_dim)
        self.out_maps = nn.Parameter(torch.empty(N_NODES, hidden_dim, embed_dim))  # W_t of eq. 14
        nn.init.xavier_uniform_(self.out_maps.view(N_NODES * hidden_dim, embed_dim))
        self.entity_clf = nn.Linear(hidden_dim, n_entities)      # W_e, eq. 12
        self.relation_clf = nn.Linear(hidden_dim, n_relations)   # W_r, eq. 13
        self.node_input_dim = node_input_dim
        self.hidden_dim = hidden_dim

    def node_states(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D] → hidden states h_t of all nodes [B, 7, hidden]."""
        B = x.shape[0]
        inputs = self.node_maps(x).view(B, N_NODES, self.node_input_dim)
        zero = x.new_zeros(B, self.hidden_dim)
        h: dict[int, torch.Tensor] = {}
        fc: dict[int, torch.Tensor] = {}
        for t in self.order:
            kids = self.children_of[t]
            h_sum = sum((h[k] for k in kids), zero)
            fc_sum = sum((fc[k] for k in kids), zero)
            h_t, c_t, f_t = self.cell(inputs[:, t], h_sum, fc_sum)
            h[t], fc[t] = h_t, f_t * c_t
        return torch.stack([h[t] for t in range(N_NODES)], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hs = self.node_states(x)                                  # [B, 7, h]
        emb = torch.einsum("bth,thd->bd", hs, self.out_maps)      # eq. 14
        ent = self.entity_clf(hs[:, list(ENTITY_NODES)])          # [B, 4, n_entities]
        rel = self.relation_clf(hs[:, list(RELATION_NODES)])      # [B, 3, n_relations]
        return emb, ent, rel
