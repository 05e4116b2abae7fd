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


def test_scan_family_captions_are_wrapped_in_start_and_end(tmp_path):
    """models.scan.tokens.start_end (SCAN data.py): <start> (1) + words + <end> (2); stored tokens unchanged."""
    import pyarrow.parquet as pq

    from itmatch.corpus.data import Corpus, TextOptions
    from itmatch.corpus.synthetic import write_synthetic_corpus
    from itmatch.recipes import load_recipe_config, resolve

    paths = write_synthetic_corpus(tmp_path, n_train=6, n_val=2, n_test=2, R=3, D=8)
    stored = pq.read_table(paths.tokens).column("tokens").to_pylist()[0]
    config = load_recipe_config()
    opts = {m: TextOptions.from_config(resolve(config, m, "coco")["model"]) for m in ("scan", "pfan", "glfn")}
    assert opts["scan"].start_end and opts["pfan"].start_end and not opts["glfn"].start_end
    item = Corpus(paths, frozenset(), opts["scan"]).caption_item(0)
    assert item["tokens"].tolist() == [1, *stored, 2]
    assert Corpus(paths, frozenset(), opts["glfn"]).caption_item(0)["tokens"].tolist() == stored
    with pytest.raises(ValueError, match="start_end: true needs token ids"):
        Corpus(paths, frozenset({"bert"}), TextOptions(True, None))
