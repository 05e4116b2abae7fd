"""GLFN: tag branch, position attention, ablations (Table 3), fusion, gradient flow."""

from __future__ import annotations

import pytest
import torch

from itmatch.models.glfn import GLFN, TagPositionImageEncoder
from itmatch.models.registry import model_inputs
from itmatch.training.loss import ContrastiveLoss
from tests.conftest import REPO, TEST_CONFIG, run_snakemake

DATA = dict(vocab_size=30, feature_dim=12, tag_dim=10, blocks_K=4, bert_dim=14)
TINY = dict(embed_dim=16, block_dim=6, word_dim=8)


def _batch(B: int = 4, R: int = 5, L: int = 3, W: int = 6):
    g = torch.Generator().manual_seed(1)
    imgs = {"features": torch.randn(B, R, 12, generator=g), "num_regions": torch.tensor([5, 3, 4, 2])[:B],
            "tag_vectors": torch.randn(B, R, 10, generator=g),
            "block_index": torch.randint(0, 16, (B, R, L), generator=g),
            "block_weight": torch.rand(B, R, L, generator=g)}
    imgs["block_weight"] /= imgs["block_weight"].sum(-1, keepdim=True)
    caps = {"tokens": torch.randint(1, 30, (B, W), generator=g), "lengths": torch.tensor([6, 4, 3, 5])[:B],
            "bert": torch.randn(B, W, 14, generator=g)}
    return imgs, caps


def _model(**cfg) -> GLFN:
    torch.manual_seed(0)
    return GLFN.from_config({**TINY, **cfg}, DATA)


def test_position_attention_query_is_region_plus_tag():
    enc = TagPositionImageEncoder(feature_dim=12, tag_dim=10, K=4, block_dim=6, embed_dim=16)
    imgs = {"features": torch.randn(1, 1, 12), "tag_vectors": torch.randn(1, 1, 10),
            "block_index": torch.tensor([[[3, 7, 16]]]),      # 16 = K² = padding
            "block_weight": torch.tensor([[[0.75, 0.25, 0.0]]]), "num_regions": torch.tensor([1])}
    obj = enc.objects(imgs)
    assert obj.shape == (1, 1, 22)
    p = enc.position(obj, imgs["block_index"], imgs["block_weight"])
    vb = enc.position.embed(imgs["block_index"])[0, 0]        # [3, 6]
    q = obj[0, 0] @ enc.position.M                            # f(o_i), eq. 7: [visual, tag] → D_b
    gamma = torch.tanh(vb @ q).softmax(0) * imgs["block_weight"][0, 0]   # eq. 8–10
    gamma = gamma / gamma.sum()                               # eq. 11
    torch.testing.assert_close(p[0, 0], gamma @ vb)           # eq. 12
    assert gamma[2] == 0
    # the tag changes the position query, hence p
    imgs2 = {**imgs, "tag_vectors": imgs["tag_vectors"] + 1.0}
    assert not torch.allclose(enc.position(enc.objects(imgs2), imgs["block_index"], imgs["block_weight"]), p)
    v = enc(imgs)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(1, 1))


def test_zeroing_tags_changes_regions_and_scores():
    model = _model()
    model.eval()
    imgs, caps = _batch()
    no_tags = {**imgs, "tag_vectors": torch.zeros_like(imgs["tag_vectors"])}
    with torch.no_grad():
        r1 = model.t2i.img(imgs)
        r0 = model.t2i.img(no_tags)
        assert (r1 - r0)[0, :5].abs().amax(-1).min() > 1e-3  # every valid region of image 0 changes
        cap = model.encode_captions(caps)
        s1 = model.score(model.encode_images(imgs), cap)
        s0 = model.score(model.encode_images(no_tags), cap)
    assert (s1 - s0).abs().max() > 1e-4
    # No-Tag ablation: the tag vectors are not read at all
    ablated = _model(use_tags=False)
    del no_tags["tag_vectors"]
    ablated.score(ablated.encode_images(no_tags), ablated.encode_captions(caps))
    assert "tags" not in ablated.requires


def test_fused_score_is_alpha_mix_of_directions():
    model = _model(alpha=0.3)
    imgs, caps = _batch()
    with torch.no_grad():
        img, cap = model.encode_images(imgs), model.encode_captions(caps)
        s_t2i = model.direction_scores(img["t2i"], cap["t2i"], "t2i")
        s_i2t = model.direction_scores(img["i2t"], cap["i2t"], "i2t")
        torch.testing.assert_close(model.score(img, cap), 0.3 * s_i2t + 0.7 * s_t2i)
    assert s_t2i.shape == (4, 4)


def test_padding_does_not_change_scores():
    model = _model()
    imgs, caps = _batch()
    with torch.no_grad():
        s = model.score(model.encode_images(imgs), model.encode_captions(caps))
        imgs2 = {k: v.clone() for k, v in imgs.items()}
        imgs2["features"][1, 3:] = 50.0                  # image 1 has 3 regions
        caps2 = {k: v.clone() for k, v in caps.items()}
        caps2["bert"][2, 3:] = -9.0                       # caption 2 has 3 words
        caps2["tokens"][2, 3:] = 0
        s2 = model.score(model.encode_images(imgs2), model.encode_captions(caps2))
    torch.testing.assert_close(s, s2)


@pytest.mark.parametrize("cfg", [
    {},                                  # full model, separate t2i / i2t branches
    {"use_tags": False},                 # No-Tag
    {"text": "gru"},                     # Only-GRU
    {"text": "bert"},                    # Only-BERT
    {"separate_branches": False},        # shared encoders trained on the fused similarity
])
def test_ablations_build_train_one_step_and_all_params_get_gradient(cfg):
    model = _model(**cfg)
    imgs, caps = _batch()
    if cfg.get("text") == "gru":
        del caps["bert"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss, logs = model.loss(imgs, caps, ContrastiveLoss(0.2))
    assert torch.isfinite(loss) and loss > 0 and "rank_loss" in logs
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient: {missing}"
    opt.step()


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="text"):
        _model(text="lstm")
    with pytest.raises(ValueError, match="unknown keys"):
        _model(alpha_=0.5)
    with pytest.raises(KeyError, match="tag_dim"):
        GLFN.from_config(TINY, {k: v for k, v in DATA.items() if k != "tag_dim"})


def test_inputs_follow_the_settings():
    """GLFN's optional inputs come from its resolved settings: no tags.h5 without tags, no bert.h5 for Only-GRU."""
    assert model_inputs("glfn", {}) == {"blocks", "tags", "bert"}
    assert model_inputs("glfn", {"use_tags": False}) == {"blocks", "bert"}
    assert model_inputs("glfn", {"use_tags": False, "text": "gru"}) == {"blocks"}
    assert model_inputs("pfan", {"use_tags": False}) == {"blocks"}


def test_glfn_without_tags_plans_no_tag_vectors(tmp_path):
    override = tmp_path / "no_tags.yaml"
    override.write_text("models:\n  glfn:\n    use_tags: false\n")
    with_tags = run_snakemake(tmp_path / "a", "-n", "results/glfn/shapes/metrics.json")
    without = run_snakemake(tmp_path / "b", "-n", "results/glfn/shapes/metrics.json", "--configfile",
                            str(REPO / "config" / "config.yaml"), str(TEST_CONFIG), str(override))
    assert "rule tag_vectors:" in with_tags.stdout
    assert "rule tag_vectors:" not in without.stdout
    assert "rule train_part:" in without.stdout


def test_fused_parts_are_one_direction_each_and_fuse_with_alpha(tmp_path):
    """fuse: [t2i, i2t] (§4.2): each part holds one encoder set, scores and trains its own direction; evaluation
    sums the parts' similarities weighted α (i2t) and 1 − α (t2i), eq. 33."""
    imgs, caps = _batch()
    both = _model(alpha=0.3)
    parts = {}
    for d in ("t2i", "i2t"):
        m = GLFN.from_config({**TINY, "alpha": 0.3, "direction": d}, DATA)
        other = "i2t" if d == "t2i" else "t2i"
        assert not hasattr(m, other) and all(n.startswith(f"{d}.") for n, _ in m.named_parameters())
        getattr(m, d).load_state_dict(getattr(both, d).state_dict())
        parts[d] = m
        s = m.score(m.encode_images(imgs), m.encode_captions(caps))
        ref = both.direction_scores(both.encode_images(imgs)[d], both.encode_captions(caps)[d], d)
        assert torch.allclose(s, ref, atol=1e-6)
        loss, _ = m.loss(imgs, caps, ContrastiveLoss(0.2, True))
        loss.backward()
        assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    assert parts["i2t"].fusion_weight == pytest.approx(0.3) and parts["t2i"].fusion_weight == pytest.approx(0.7)
    assert both.fusion_weight is None
    fused = sum(p.fusion_weight * p.score(p.encode_images(imgs), p.encode_captions(caps)) for p in parts.values())
    assert torch.allclose(fused, both.score(both.encode_images(imgs), both.encode_captions(caps)), atol=1e-6)
    with pytest.raises(ValueError, match="direction must be 't2i' or 'i2t'"):
        GLFN.from_config({**TINY, "direction": "both"}, DATA)


def test_glfn_trains_as_two_jobs_with_their_own_logs(tmp_path):
    """The DAG plans GLFN as two train_part jobs (own logs and best epochs) joined by fuse_parts."""
    out = run_snakemake(tmp_path, "-n", "results/glfn/shapes/model.pt").stdout
    assert out.count("rule train_part:") == 2 and "rule fuse_parts:" in out and "rule train_model:" not in out
    for d in ("t2i", "i2t"):
        assert f"results/glfn/shapes/{d}/train_log.csv" in out and f"logs/train/glfn/shapes.{d}.log" in out
