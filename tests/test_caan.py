"""CAAN (itmatch/models/caan.py): equations on hand-checkable tensors, pairwise batching, ablations, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from itmatch.models.caan import CAAN, inter_attention, semantic_intra_attention
from itmatch.models.registry import build_model
from itmatch.training.loss import ContrastiveLoss

ABLATIONS = {  # Table 4 rows → (inter_attention, intra_attention)
    "baseline": (False, "none"), "+IA": (True, "none"), "+FA": (False, "fa"),
    "+SA": (False, "sa"), "+IA+FA": (True, "fa"), "CAAN": (True, "sa"),
}
FEAT, VOCAB = 24, 40


def batch(n_img: int = 4, n_cap: int = 5, R: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    num = torch.tensor([R, 2, 5, 1, 4, 3][:n_img])
    feats = torch.rand(n_img, R, FEAT, generator=g)
    feats = feats * (torch.arange(R)[None, :, None] < num[:, None, None])
    lens = torch.tensor([4, 1, 6, 2, 3, 5][:n_cap])
    W = int(lens.max())
    tok = torch.randint(1, VOCAB, (n_cap, W), generator=g)
    tok[torch.arange(W)[None] >= lens[:, None]] = 0
    images = {"features": feats, "num_regions": num, "object_conf": torch.rand(n_img, R, generator=g),
              "index": torch.arange(n_img)}
    captions = {"tokens": tok, "lengths": lens, "image_index": torch.arange(n_cap) % n_img}
    return images, captions


def tiny(inter: bool = True, intra: str = "sa", **kw) -> CAAN:
    torch.manual_seed(0)
    return CAAN(VOCAB, FEAT, embed_dim=16, word_dim=12, attn_dim=8, inter_attention=inter,
                intra_attention=intra, **kw)


# ---- eq. 12-13 -------------------------------------------------------------------------------
def test_inter_attention_clips_and_normalises_along_the_other_modality():
    H = torch.tensor([[0.6, -0.2, 0.0],
                      [0.8, 0.5, -0.1]])          # 2 regions × 3 words
    Huv, Hvu = inter_attention(H)
    # eq. 12: each word's column over the regions: [.6, .8]/1, [0, .5]/.5, [0, 0] (all clipped)
    assert torch.allclose(Huv, torch.tensor([[0.6, 0.0, 0.0], [0.8, 1.0, 0.0]]), atol=1e-6)
    # eq. 13: each region's row over the words: [.6,0,0]/.6, [.8,.5,0]/sqrt(.89)
    r = math.sqrt(0.89)
    assert torch.allclose(Hvu, torch.tensor([[1.0, 0.0, 0.0], [0.8 / r, 0.5 / r, 0.0]]), atol=1e-6)


# ---- eq. 16-17 -------------------------------------------------------------------------------
def test_semantic_attention_is_cosine_of_response_vectors():
    A = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])   # 3 regions × 2 words
    Hv, Hu = semantic_intra_attention(A, A)
    s = 1 / math.sqrt(2)
    # rows of Huv: [1,0], [1,1]/√2, [0,1] → pairwise cosines
    assert torch.allclose(Hv, torch.tensor([[1, s, 0], [s, 1, s], [0, s, 1.0]]), atol=1e-6)
    # columns of Hvu: [1,1,0]/√2, [0,1,2]/√5 → cosine 1/√10
    c = 1 / math.sqrt(10)
    assert torch.allclose(Hu, torch.tensor([[1, c], [c, 1.0]]), atol=1e-6)


# ---- eq. 5-11 against a literal one-pair implementation in the paper's notation --------------
def _paper_score(m: CAAN, V: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """V [d, n], U [d, m] as in the paper (columns = fragments); eq. 7-17, 5-6, S = ⟨v̂, û⟩ of l2-normed."""
    H = torch.tanh(V.t() @ m.K @ U)                               # [n, m]
    Hp = H.clamp(min=0)
    Huv = Hp / Hp.pow(2).sum(0, keepdim=True).sqrt().clamp(min=1e-8)
    Hvu = Hp / Hp.pow(2).sum(1, keepdim=True).sqrt().clamp(min=1e-8)
    rows = Huv / Huv.norm(dim=1, keepdim=True).clamp(min=1e-8)
    cols = Hvu / Hvu.norm(dim=0, keepdim=True).clamp(min=1e-8)
    Hv, Hu = rows @ rows.t(), cols.t() @ cols
    f = torch.softmax(torch.tanh(Hv @ V.t() @ m.Q1 + Huv @ U.t() @ m.Q2) @ m.Wv, 0)
    g = torch.softmax(torch.tanh(Hu @ U.t() @ m.Q3 + Hvu.t() @ V.t() @ m.Q4) @ m.Wu, 0)
    v_hat, u_hat = V @ f, U @ g
    return F.normalize(v_hat, dim=0) @ F.normalize(u_hat, dim=0)


def test_full_caan_matches_the_papers_equations_for_one_pair():
    m = tiny().eval()
    images, captions = batch(1, 1)
    with torch.no_grad():
        img, cap = m.encode_images(images), m.encode_captions(captions)
        n, L = int(images["num_regions"][0]), int(captions["lengths"][0])
        expected = _paper_score(m, img["V"][0, :n].t(), cap["U"][0, :L].t())
        assert torch.allclose(m.score(img, cap)[0, 0], expected, atol=1e-6)


def test_baseline_is_cosine_of_mean_pooled_fragments():
    m = tiny(False, "none").eval()
    images, captions = batch()
    with torch.no_grad():
        img, cap = m.encode_images(images), m.encode_captions(captions)
        vm = img["V"].sum(1) / images["num_regions"][:, None]
        um = cap["U"].sum(1) / captions["lengths"][:, None]
        expected = F.normalize(vm, dim=-1) @ F.normalize(um, dim=-1).t()
        assert torch.allclose(m.score(img, cap), expected, atol=1e-6)
    assert not hasattr(m, "K") and not hasattr(m, "Q1")   # the baseline has no attention parameters


def test_attention_weights_are_distributions_over_valid_fragments():
    m = tiny().eval()
    images, captions = batch()
    with torch.no_grad():
        f, g = m.attend(m.encode_images(images), m.encode_captions(captions))
    assert torch.allclose(f.sum(-1), torch.ones(f.shape[:2])) and torch.allclose(g.sum(-1), torch.ones(g.shape[:2]))
    pad_v = torch.arange(f.shape[-1])[None] >= images["num_regions"][:, None]    # [I, n]
    pad_u = torch.arange(g.shape[-1])[None] >= captions["lengths"][:, None]      # [C, m]
    assert (f.permute(1, 0, 2)[:, pad_v] == 0).all() and (g[:, pad_u] == 0).all()


# ---- batched pairwise scoring == per-pair loop -------------------------------------------------
@pytest.mark.parametrize("name", list(ABLATIONS))
def test_batched_scoring_equals_per_pair_loop(name):
    inter, intra = ABLATIONS[name]
    m = tiny(inter, intra, pair_chunk=3).eval()     # chunks of 3 pairs: images and captions both split
    images, captions = batch()
    with torch.no_grad():
        sim = m.score(m.encode_images(images), m.encode_captions(captions))
        ref = torch.empty_like(sim)
        for i in range(sim.shape[0]):
            n = int(images["num_regions"][i])      # each image alone, trimmed to its regions
            img = m.encode_images({"features": images["features"][i:i + 1, :n],
                                   "num_regions": images["num_regions"][i:i + 1]})
            for c in range(sim.shape[1]):
                L = int(captions["lengths"][c])
                cap = m.encode_captions({"tokens": captions["tokens"][c:c + 1, :L],
                                         "lengths": captions["lengths"][c:c + 1]})
                ref[i, c] = m.score(img, cap)[0, 0]
    assert sim.shape == (4, 5)
    assert (sim - ref).abs().max() < 1e-5


# ---- training: every ablation builds from config, runs forward/backward, every param gets a grad
@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_builds_and_every_parameter_gets_a_gradient(name):
    inter, intra = ABLATIONS[name]
    cfg = {"embed_dim": 16, "word_dim": 12, "attn_dim": 8, "inter_attention": inter, "intra_attention": intra,
           "pair_chunk": 5, "training": {"lr": 1e-3}}
    torch.manual_seed(1)
    m = build_model("caan", cfg, {"vocab_size": VOCAB, "feature_dim": FEAT}).train()
    images, captions = batch(4, 4)
    loss, stats = m.loss(images, captions, ContrastiveLoss(margin=0.2))
    assert loss.item() > 0 and "rank_loss" in stats
    loss.backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"


def test_checkpointed_chunks_give_the_same_gradients():
    images, captions = batch(4, 4)
    grads = []
    for ckpt in (False, True):
        m = tiny(pair_chunk=3, checkpoint=ckpt).train()
        m.loss(images, captions, ContrastiveLoss())[0].backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_bad_intra_attention_is_rejected():
    with pytest.raises(ValueError, match="intra_attention"):
        CAAN(VOCAB, FEAT, intra_attention="both")


def test_parameter_count_matches_the_papers_11m():
    """§4.4: "ours is only 11 M" — the configured D = 768, z = 512 with Flickr30K's 8,481-word vocabulary."""
    from itmatch.recipes import load_recipe_config, resolve

    cfg = resolve(load_recipe_config(), "caan", "f30k")["model"]
    m = build_model("caan", cfg, {"vocab_size": 8481, "feature_dim": 2048})
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert n == 11_212_204
    assert (cfg["embed_dim"], cfg["attn_dim"]) == (768, 512)
