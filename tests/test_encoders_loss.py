"""Shared encoders and the ranking loss."""

from __future__ import annotations

import torch

from itmatch.models.encoders import GRUTextEncoder, RegionEncoder, l2norm
from itmatch.training.loss import ContrastiveLoss


def test_hardest_negative_loss_by_hand():
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.6, 0.2], [0.0, 0.3, 0.7]])
    # rows (image → captions): i0: max(0.2-0.9+0.5, 0.2-0.9+0.1)=0 ; i1: 0.2-0.6+0.8=0.4 ; i2: 0.2-0.7+0.3=-0.2→0
    # cols (caption → images): c0: 0.2-0.9+0.8=0.1 ; c1: 0.2-0.6+0.5=0.1 ; c2: 0.2-0.7+0.2=-0.3→0
    assert torch.isclose(ContrastiveLoss(0.2)(sim), torch.tensor(0.6))
    # sum of all violations: rows 0.4 (+0 others) ; cols 0.1+0.1 ; plus i1→c2? 0.2-0.6+0.2=-0.2 no
    assert torch.isclose(ContrastiveLoss(0.2, max_violation=False)(sim), torch.tensor(0.6))


def test_text_encoder_ignores_padding_and_averages_directions():
    torch.manual_seed(0)
    enc = GRUTextEncoder(vocab_size=20, embed_dim=8, word_dim=6)
    tokens = torch.tensor([[3, 4, 5, 0, 0], [3, 4, 5, 6, 7]])
    out = enc(tokens, torch.tensor([3, 5]))
    assert out.shape == (2, 5, 8)
    assert torch.all(out[0, 3:] == 0)
    alone = enc(tokens[:1, :3], torch.tensor([3]))
    torch.testing.assert_close(out[0, :3], alone[0])
    torch.testing.assert_close(out[1].norm(dim=-1), torch.ones(5))


def test_region_encoder_masks_and_normalises():
    enc = RegionEncoder(16, 4)
    x = enc(torch.randn(2, 3, 16), torch.tensor([3, 1]))
    torch.testing.assert_close(x[0].norm(dim=-1), torch.ones(3))
    assert torch.all(x[1, 1:] == 0)
    torch.testing.assert_close(l2norm(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]))
