"""PFAN position attention (eq. 5–8) by hand, the released-code options, and the model interface."""

from __future__ import annotations

import pytest
import torch

from itmatch.models.attention import t2i_scores
from itmatch.models.pfan import PFAN, PositionAttention
from itmatch.models.registry import build_model


def test_position_attention_matches_equations():
    torch.manual_seed(0)
    K, D, iota = 3, 5, 4
    pa = PositionAttention(D, K, iota, "renorm")
    feats = torch.randn(1, 2, D)
    idx = torch.tensor([[[4, 1, 9], [0, 9, 9]]])  # padding = K² = 9
    w = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])
    p = pa(feats, idx, w)
    E, M = pa.embed.weight.detach(), pa.M.detach()
    assert torch.equal(E[9], torch.zeros(iota))  # padding entry fixed at 0
    for r in range(2):
        b = E[idx[0, r]]  # [L, ι]
        beta = torch.tanh(b @ (feats[0, r] @ M))  # eq. 5-6
        g0 = torch.softmax(beta, 0) * w[0, r]  # eq. 8
        gamma = g0 / g0.sum()
        torch.testing.assert_close(p[0, r], gamma @ b)  # eq. 7
        assert gamma[w[0, r] == 0].abs().sum() == 0  # padding cells get no weight
    soft = PositionAttention(D, K, iota, "softmax")
    soft.load_state_dict(pa.state_dict())
    b = E[idx[0, 1]]
    g0 = torch.softmax(torch.tanh(b @ (feats[0, 1] @ M)), 0) * w[0, 1]
    torch.testing.assert_close(soft(feats, idx, w)[0, 1], torch.softmax(g0, 0) @ b)  # released: 2nd softmax
    with pytest.raises(ValueError, match="position_norm"):
        PositionAttention(D, K, iota, "x")


def _batch(B=4, R=5, D=12, L=3, K=4, W=6, V=20):
    g = torch.Generator().manual_seed(1)
    images = {"features": torch.randn(B, R, D, generator=g), "num_regions": torch.tensor([5, 3, 5, 4])[:B],
              "block_index": torch.randint(0, K * K + 1, (B, R, L), generator=g),
              "block_weight": torch.rand(B, R, L, generator=g)}
    caps = {"tokens": torch.randint(4, V, (B, W), generator=g), "lengths": torch.tensor([6, 2, 4, 5])[:B]}
    return images, caps


def test_pfan_model_scores_and_options():
    images, caps = _batch()
    info = {"vocab_size": 20, "feature_dim": 12, "blocks_K": 4}
    m = build_model("pfan", {"embed_dim": 8, "word_dim": 6, "block_dim": 4, "direction": "t2i"}, info)
    assert isinstance(m, PFAN) and m.requires == frozenset({"blocks"})
    img, cap = m.encode_images(images), m.encode_captions(caps)
    sim = m.score(img, cap)
    assert sim.shape == (4, 4)
    torch.testing.assert_close(sim, t2i_scores(img["V"], img["n"], cap["E"], cap["lens"], lambda_softmax=9.0,
                                                agg="LogSumExp", lambda_lse=6.0))
    m2 = build_model("pfan", {"embed_dim": 8, "word_dim": 6, "block_dim": 4, "max_term": 0.5}, info)
    m2.load_state_dict(m.state_dict())
    assert not torch.allclose(m2.score(m2.encode_images(images), m2.encode_captions(caps)), sim)
    i2t = build_model("pfan", {"embed_dim": 8, "word_dim": 6, "block_dim": 4, "direction": "i2t",
                               "i2t": {"lambda_softmax": 4.0, "agg": "Mean"}}, info)
    assert i2t.hp["agg"] == "Mean" and i2t.score(i2t.encode_images(images), i2t.encode_captions(caps)).shape == (4, 4)
    with pytest.raises(KeyError, match="blocks_K"):
        build_model("pfan", {}, {"vocab_size": 20, "feature_dim": 12})
    with pytest.raises(KeyError, match="block_index"):
        m.encode_images({k: v for k, v in images.items() if not k.startswith("block")})
