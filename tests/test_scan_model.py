"""SCAN model: encoders + attention, both directions, gradients through padding, config errors."""

from __future__ import annotations

import pytest
import torch

from itmatch.models.registry import build_model
from itmatch.training.loss import ContrastiveLoss


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_scan_trains_one_step(direction):
    torch.manual_seed(0)
    info = {"vocab_size": 30, "feature_dim": 10}
    m = build_model("scan", {"embed_dim": 8, "word_dim": 6, "direction": direction}, info)
    images = {"features": torch.randn(3, 4, 10), "num_regions": torch.tensor([4, 2, 3])}
    caps = {"tokens": torch.randint(4, 30, (3, 5)), "lengths": torch.tensor([5, 1, 3])}
    caps["tokens"][1, 1:] = 0
    loss, parts = m.loss(images, caps, ContrastiveLoss())
    loss.backward()
    assert torch.isfinite(loss) and parts["rank_loss"] >= 0
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.score(m.encode_images(images), m.encode_captions(caps)).shape == (3, 3)
    with pytest.raises(ValueError, match="direction"):
        build_model("scan", {"direction": "both"}, info)
