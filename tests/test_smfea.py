"""SMFEA: tree-LSTM by hand, null-label masking, KL direction, ablations, gradient flow."""

from __future__ import annotations

import math

import pytest
import torch

from itmatch.models.smfea import SMFEA, attention_pool, node_cross_entropy, node_kl
from itmatch.models.tree_lstm import STRUCTURES, StructuredTreeEncoder, evaluation_order
from itmatch.training.loss import ContrastiveLoss

DATA = dict(vocab_size=30, feature_dim=12, n_entities=9, n_relations=4, n_concepts=5)
TINY = dict(embed_dim=16, word_dim=8, node_input_dim=10, hidden_dim=6)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_tree_lstm_matches_hand_computation():
    """1-d tree: node t gets input x_t = m_t·x; gates with weights (i,f,o,u) on x_t and on Σ h_children."""
    enc = StructuredTreeEncoder(embed_dim=1, node_input_dim=1, hidden_dim=1, n_entities=2, n_relations=2)
    m = [0.5, -1.0, 1.5, 2.0, -0.5, 1.0, 0.25]        # eq. 5 maps, node 1..7
    wx = dict(i=0.3, f=-0.2, o=0.7, u=1.1)             # W^*
    bx = dict(i=0.1, f=0.2, o=-0.1, u=0.05)            # biases
    uh = dict(i=0.4, f=0.9, o=-0.6, u=0.8)             # U^*
    out = [1.0, 2.0, -1.0, 0.5, 1.5, -2.0, 3.0]        # eq. 14 maps W_t (hidden → 1)
    with torch.no_grad():
        enc.node_maps.weight.copy_(torch.tensor(m).view(7, 1))
        enc.node_maps.bias.zero_()
        enc.cell.W.weight.copy_(torch.tensor([wx[g] for g in "ifou"]).view(4, 1))
        enc.cell.W.bias.copy_(torch.tensor([bx[g] for g in "ifou"]))
        enc.cell.U.weight.copy_(torch.tensor([uh[g] for g in "ifou"]).view(4, 1))
        enc.out_maps.copy_(torch.tensor(out).view(7, 1, 1))
    x = 0.8
    children = {1: [], 3: [], 5: [], 7: [], 2: [1, 3], 6: [5, 7], 4: [2, 6]}
    h, c, f = {}, {}, {}
    for t in (1, 3, 5, 7, 2, 6, 4):
        xt = m[t - 1] * x
        hs = sum(h[k] for k in children[t])
        fcs = sum(f[k] * c[k] for k in children[t])
        g = {k: wx[k] * xt + bx[k] + uh[k] * hs for k in "ifou"}
        i, f[t], o, u = _sig(g["i"]), _sig(g["f"]), _sig(g["o"]), math.tanh(g["u"])
        c[t] = i * u + f[t] * fcs
        h[t] = o * math.tanh(c[t])
    states = enc.node_states(torch.tensor([[x]]))[0, :, 0]
    torch.testing.assert_close(states, torch.tensor([h[t] for t in range(1, 8)]), atol=1e-6, rtol=1e-6)
    emb, ent, rel = enc(torch.tensor([[x]]))
    torch.testing.assert_close(emb[0, 0], torch.tensor(sum(out[t - 1] * h[t] for t in range(1, 8))))
    assert ent.shape == (1, 4, 2) and rel.shape == (1, 3, 2)
    # the root (node 4) depends on every leaf; in the 'linear' variant it depends on nothing else
    assert evaluation_order(STRUCTURES["tree"])[-1] == 3


def test_null_labels_are_masked_in_cross_entropy():
    torch.manual_seed(0)
    ent, rel = torch.randn(2, 4, 9), torch.randn(2, 3, 4)
    labels = torch.tensor([[3, 1, 5, 2, -1, -1, 8], [-1, -1, -1, -1, -1, -1, -1]])  # nodes 1..7
    ce = node_cross_entropy(ent, rel, labels)
    lp_e, lp_r = ent.log_softmax(-1), rel.log_softmax(-1)
    # sample 0: entities at nodes 1,3,7 (leaf slots 0,1,3), relations at nodes 2,4 (slots 0,1); node 5,6 null
    want = -(lp_e[0, 0, 3] + lp_e[0, 1, 5] + lp_e[0, 3, 8] + lp_r[0, 0, 1] + lp_r[0, 1, 2])
    torch.testing.assert_close(ce[0], want)
    assert ce[1] == 0
    # changing the logits of a null node changes nothing
    ent2 = ent.clone()
    ent2[0, 2] += 5.0
    torch.testing.assert_close(node_cross_entropy(ent2, rel, labels), ce)


def test_kl_direction_visual_is_reference():
    p_logits = torch.tensor([[2.0, 0.0, -1.0]])   # visual node distribution P^V
    q_logits = torch.tensor([[0.0, 1.0, 0.5]])    # textual P^S
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    kl_pq = (p * (p / q).log()).sum()
    kl_qp = (q * (q / p).log()).sum()
    assert not torch.isclose(kl_pq, kl_qp)
    torch.testing.assert_close(node_kl(p_logits, q_logits)[0], kl_pq)
    # and SMFEA.loss calls it as KL(P^V ‖ P^S): equal to F.kl_div(log P^S, P^V)
    torch.testing.assert_close(kl_pq, torch.nn.functional.kl_div(q.log(), p, reduction="sum"))


def test_model_loss_uses_visual_first_in_kl(monkeypatch):
    import itmatch.models.smfea as smfea

    calls = []
    orig = smfea.node_kl

    def spy(p, q):
        calls.append((p, q))
        return orig(p, q)

    monkeypatch.setattr(smfea, "node_kl", spy)
    model, imgs, caps = _model_and_batch(ce_weight=0.0)
    vf, v_ent, v_rel = model._images(imgs)[:3]
    model.loss(imgs, caps, ContrastiveLoss())
    torch.testing.assert_close(calls[0][0], v_ent)  # first argument (the reference) is the visual tree's


def test_attention_pool_ignores_padding():
    x = torch.randn(1, 5, 4)
    full = attention_pool(x, torch.tensor([3]))
    x2 = x.clone()
    x2[:, 3:] = 100.0
    torch.testing.assert_close(attention_pool(x2, torch.tensor([3])), full)
    # one region → that region
    torch.testing.assert_close(attention_pool(x, torch.tensor([1]))[0], x[0, 0])


def _model_and_batch(**cfg):
    torch.manual_seed(0)
    model = SMFEA.from_config({**TINY, **cfg}, DATA)
    B = 4
    imgs = {"features": torch.randn(B, 5, 12), "num_regions": torch.tensor([5, 3, 4, 2])}
    caps = {"tokens": torch.randint(1, 30, (B, 6)), "lengths": torch.tensor([6, 4, 3, 5]),
            "tree_labels": torch.tensor([[1, 0, 2, -1, 3, 1, 4]] * B),
            "concept_labels": torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1], [0, 0, 0, 1, 0]])}
    caps["image_concept_labels"] = caps["concept_labels"]
    return model, imgs, caps


@pytest.mark.parametrize("cfg", [
    {},                                   # full model (β = 0.6 / 0.2 / 0.2, with the CAC branch)
    {"beta_c": 0.0, "beta_t": 0.4},       # Table 6 row [0.6, 0.4, 0.0]: no CAC branch
    {"beta_c": 0.4, "beta_t": 0.0},       # Table 6 row [0.6, 0.0, 0.4]
    {"use_trees": False},                 # w/o trees (Table 5)
    {"kl_weight": 0.0},                   # w/o KL
    {"ce_weight": 0.0},                   # w/o CE
    {"structure": "chain"},               # chain-based encoder (Table 7)
    {"structure": "linear"},
    {"beta_d": 1.0, "beta_t": 0.0, "beta_c": 0.0},   # Table 6 first row
])
def test_ablations_build_train_one_step_and_all_params_get_gradient(cfg):
    model, imgs, caps = _model_and_batch(**cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss, logs = model.loss(imgs, caps, ContrastiveLoss())
    assert torch.isfinite(loss) and "rank_loss" in logs
    assert ("ce_loss" in logs) == (cfg.get("use_trees", True) and cfg.get("ce_weight", 1.0) > 0)
    assert ("kl_loss" in logs) == (cfg.get("use_trees", True) and cfg.get("kl_weight", 1.0) > 0)
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {n for n, _ in model.named_parameters()}
    assert ("concept_kl_loss" in logs) == (cfg.get("beta_c", 0.2) > 0)
    if cfg.get("beta_t", 0.2) == 0:       # V^T not fused: the eq. 14 maps are unused
        expected = {n for n in expected if "out_maps" not in n}
    if cfg.get("structure") == "linear":  # no children: U^* unused
        expected = {n for n in expected if "cell.U" not in n}
    assert expected <= trained, f"no gradient: {sorted(expected - trained)}"
    opt.step()
    sim = model.score(model.encode_images(imgs), model.encode_captions(caps))
    assert sim.shape == (4, 4) and sim.abs().max() <= 1 + 1e-5


def test_without_trees_does_not_need_labels_and_cac_needs_concepts():
    model, imgs, caps = _model_and_batch(use_trees=False)
    del caps["tree_labels"]
    model.loss(imgs, caps, ContrastiveLoss())
    data = {k: v for k, v in DATA.items() if k != "n_concepts"}
    with pytest.raises(KeyError, match="n_concepts"):
        SMFEA.from_config({**TINY, "beta_c": 0.2}, data)
    del caps["concept_labels"], caps["image_concept_labels"]
    with pytest.raises(KeyError, match="concept_labels"):
        model.loss(imgs, caps, ContrastiveLoss())
    with pytest.raises(ValueError, match="unknown keys"):
        SMFEA.from_config({**TINY, "betad": 0.2}, DATA)


def test_score_is_cosine_of_fused_vectors():
    model, imgs, caps = _model_and_batch()
    img, cap = model.encode_images(imgs), model.encode_captions(caps)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    want = torch.nn.functional.cosine_similarity(img[:, None], cap[None], dim=-1)
    torch.testing.assert_close(model.score(img, cap), want)
