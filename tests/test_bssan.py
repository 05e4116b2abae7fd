"""BSSAN (itmatch/models/bssan.py): eq. 8 uniform attention, objects, final score, loss, batching, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from itmatch.models.bssan import BSSAN, attention_weights, lstm_last_state
from itmatch.models.registry import build_model

FEAT, VOCAB = 24, 40


def batch(n_img: int = 4, n_cap: int = 5, R: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    num = torch.tensor([R, 2, 5, 1, 4, 3][:n_img])
    valid = torch.arange(R)[None] < num[:, None]
    feats = torch.rand(n_img, R, FEAT, generator=g) * valid[..., None]
    lens = torch.tensor([4, 1, 6, 2, 3, 5][:n_cap])
    W = int(lens.max())
    tok = torch.randint(1, VOCAB, (n_cap, W), generator=g)
    tok[torch.arange(W)[None] >= lens[:, None]] = 0
    images = {"features": feats, "num_regions": num, "object_conf": torch.rand(n_img, R, generator=g) * valid,
              "index": torch.arange(n_img)}
    captions = {"tokens": tok, "lengths": lens, "image_index": torch.arange(n_cap) % n_img}
    return images, captions


def tiny(**kw) -> BSSAN:
    torch.manual_seed(0)
    args = dict(word_dim=12, w2r_hidden=16, w2r_mlp=[8, 4], o2w_hidden=10, o2w_mlp=[8, 6, 4], num_objects=3,
                w2r_input="regions")
    return BSSAN(VOCAB, FEAT, **{**args, **kw})


# ---- eq. 1 / 8 / 9 ---------------------------------------------------------------------------
def test_attention_weights_softmax_or_uniform_for_negatives():
    logits = torch.tensor([[[1.0, 2.0, 3.0, 9.0]], [[1.0, 2.0, 3.0, 9.0]]])     # [N=2, 1, K=4]
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    a = attention_weights(logits, mask[:, None, :], torch.tensor([False, True])[:, None, None])
    assert torch.allclose(a[0, 0], torch.cat([torch.softmax(torch.tensor([1.0, 2.0, 3.0]), 0), torch.zeros(1)]))
    assert torch.allclose(a[1, 0], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))   # eq. 8: 1/D over valid regions


def test_negative_pairs_in_training_use_uniform_attention(monkeypatch):
    m = tiny().eval()                       # eval: BatchNorm on running stats, so pairs are independent
    images, captions = batch(4, 4)
    neg = torch.tensor([2, 3, 0, 1])
    monkeypatch.setattr(m, "sample_negatives", lambda *a: neg)
    with torch.no_grad():
        loss, stats = m.loss(images, captions, criterion=None)
        img, cap = m.encode_images(images), m.encode_captions(captions)
        ar = torch.arange(4)
        y_pos, y2_pos = m.pair_scores(img, cap, ar, ar)
        y_neg, y2_neg = m.pair_scores(img, cap, ar, neg, torch.ones(4, dtype=torch.bool))
        l1 = (1.0 - y_pos + y_neg).clamp(min=0).sum()
        l2 = (1.0 - y2_pos + y2_neg).clamp(min=0).sum()
        reg = sum(p.pow(2).sum() for p in m.regularized_parameters())
        assert stats["w2r_loss"] == pytest.approx(l1.item(), abs=1e-5)
        assert stats["o2w_loss"] == pytest.approx(l2.item(), abs=1e-5)
        assert loss.item() == pytest.approx((l1 + 0.6 * l2 + 0.01 * reg).item(), rel=1e-6)
        # uniform W2R attention = the LSTM over [mean of the valid regions; word] (eq. 3 with α = 1/D)
        i, c = 1, int(neg[1])
        n, L = int(images["num_regions"][i]), int(captions["lengths"][c])
        mean_r = img["R"][i, :n].mean(0)
        x = torch.cat([mean_r.expand(L, -1), cap["T"][c, :L]], dim=-1)[None]
        _, (h, _) = m.w2r_lstm(x)
        assert torch.allclose(m.w2r_mlp(h[-1])[0], y_neg[1], atol=1e-5)
        # … and differs from the softmax attention of the same pair
        y_soft, _ = m.pair_scores(img, cap, ar[1:2], neg[1:2])
        assert not torch.allclose(y_soft, y_neg[1:2])


def test_lstm_on_projected_inputs_equals_torch_lstm():
    torch.manual_seed(3)
    lstm = torch.nn.LSTM(5, 4, batch_first=True)
    x, lengths = torch.randn(3, 6, 5), torch.tensor([6, 2, 4])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    _, (h, _) = lstm(packed)
    gx = x @ lstm.weight_ih_l0.t() + lstm.bias_ih_l0 + lstm.bias_hh_l0
    assert torch.allclose(lstm_last_state(gx, lengths, lstm), h[0], atol=1e-6)


def test_o2w_uses_top_p_regions_by_confidence():
    m = tiny(num_objects=3)
    images, _ = batch()
    with torch.no_grad():
        img = m.encode_images(images)
    R = F.normalize(images["features"], dim=-1)
    for i in range(4):
        n = int(images["num_regions"][i])
        top = images["object_conf"][i, :n].argsort(descending=True)[: min(3, n)]
        k = len(top)
        assert torch.allclose(img["O"][i, :k], R[i, top])
        assert img["omask"][i].tolist() == [True] * k + [False] * (3 - k)   # image with 2 / 1 regions: padded


def test_o2w_score_is_mean_of_per_object_mlp_scores():
    m = tiny().eval()
    images, captions = batch()
    with torch.no_grad():
        img, cap = m.encode_images(images), m.encode_captions(captions)
        i, c = 1, 2                                         # image 1 has 2 regions → 2 objects
        L = int(captions["lengths"][c])
        S = cap["S"][c, :L]                                 # [L, B]
        ys = []
        for j in range(2):
            o = img["O"][i, j]
            beta = torch.softmax(torch.tanh(o @ m.o2w_W @ S.t() + m.o2w_b), 0)   # eq. 9-10
            u = beta @ S                                                         # eq. 11
            ys.append(m.o2w_mlp(torch.cat([o, u])[None])[0])                     # eq. 13
        expected = torch.stack(ys).mean()                                        # eq. 14
        got = m.pair_scores(img, cap, torch.tensor([i]), torch.tensor([c]))[1][0]
        assert torch.allclose(got, expected, atol=1e-6)


def test_final_score_is_y_plus_lambda_y_prime():
    m = tiny(lam=0.6).eval()
    images, captions = batch()
    with torch.no_grad():
        img, cap = m.encode_images(images), m.encode_captions(captions)
        sim = m.score(img, cap)
        ii, cc = torch.arange(20) // 5, torch.arange(20) % 5
        y, y2 = m.pair_scores(img, cap, ii, cc)
        assert torch.allclose(sim, (y + 0.6 * y2).view(4, 5), atol=1e-6)
        assert torch.allclose(m.combine(torch.tensor([2.0]), torch.tensor([-1.0])), torch.tensor([1.4]))


# ---- batched pairwise scoring == per-pair loop -------------------------------------------------
@pytest.mark.parametrize("branches", ["both", "w2r", "o2w"])
def test_batched_scoring_equals_per_pair_loop(branches):
    m = tiny(branches=branches, pair_chunk=3).eval()
    images, captions = batch()
    with torch.no_grad():
        sim = m.score(m.encode_images(images), m.encode_captions(captions))
        ref = torch.empty_like(sim)
        for i in range(4):
            n = int(images["num_regions"][i])
            img = m.encode_images({k: images[k][i:i + 1, :n] for k in ("features", "object_conf")}
                                  | {"num_regions": images["num_regions"][i:i + 1]})
            for c in range(5):
                L = int(captions["lengths"][c])
                cap = m.encode_captions({"tokens": captions["tokens"][c:c + 1, :L],
                                         "lengths": captions["lengths"][c:c + 1]})
                ref[i, c] = m.score(img, cap)[0, 0]
    assert (sim - ref).abs().max() < 1e-5


# ---- training -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [{}, {"branches": "w2r"}, {"branches": "o2w"}, {"delta": 0.0}])
def test_variant_builds_and_every_parameter_gets_a_gradient(variant):
    cfg = {"word_dim": 12, "w2r_hidden": 16, "w2r_mlp": [8, 4], "o2w_hidden": 10, "o2w_mlp": [8, 6, 4],
           "num_objects": 3, "w2r_input": "regions", "training": {"optimizer": "sgd"}, **variant}
    torch.manual_seed(2)
    m = build_model("bssan", cfg, {"vocab_size": VOCAB, "feature_dim": FEAT}).train()
    images, captions = batch(6, 6)
    loss, stats = m.loss(images, captions, criterion=None)
    assert loss.item() > 0 and ("reg_loss" in stats) == bool(m.delta)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{variant}: no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), name


def test_regulariser_covers_weights_not_biases_or_embedding():
    m = tiny()
    names = {n for n, p in m.named_parameters() if any(p is q for q in m.regularized_parameters())}
    assert {"w2r_W", "o2w_W", "w2r_lstm.weight_ih_l0", "o2w_lstm.weight_hh_l0_reverse", "o2w_mlp.net.0.weight"} <= names
    assert not any("bias" in n or n.startswith("embed") or n.endswith("_b") for n in names)


def test_negatives_come_from_other_images():
    m = tiny()
    images, captions = batch(6, 6)
    images["index"] = captions["image_index"] = torch.arange(6) % 3   # pairs j and j+3: the same image
    for _ in range(20):
        neg = m.sample_negatives(images, captions)
        assert (captions["image_index"][neg] != images["index"]).all()


def test_bad_branches_are_rejected():
    with pytest.raises(ValueError, match="branches"):
        BSSAN(VOCAB, FEAT, branches="w2o")
    with pytest.raises(ValueError, match="w2r_input must be one of"):
        BSSAN(VOCAB, FEAT, w2r_input="vgg")
    with pytest.raises(ValueError, match="no grid_dim"):
        BSSAN(VOCAB, FEAT)                                  # grid (the default) without its dimension


# ---- recipe inputs: GloVe word vectors and 30-word captions (§IV-B)
TINY_CFG = dict(word_dim=12, w2r_hidden=16, w2r_mlp=[8, 4], o2w_hidden=10, o2w_mlp=[8, 6, 4], num_objects=3,
                w2r_input="regions")


def _corpus_with_long_caption(tmp_path, n_words: int = 40):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from itmatch.corpus.synthetic import write_synthetic_corpus

    paths = write_synthetic_corpus(tmp_path, n_train=8, n_val=2, n_test=2, R=4, D=FEAT)
    t = pq.read_table(paths.tokens)
    toks = t.column("tokens").to_pylist()
    toks[0] = [4 + (k % 20) for k in range(n_words)]      # a 40-word caption
    pq.write_table(pa.table({"caption_id": t.column("caption_id"), "tokens": pa.array(toks, pa.list_(pa.int32()))}),
                   paths.tokens)
    return paths, toks[0]


def test_captions_longer_than_30_words_are_truncated(tmp_path):
    from itmatch.corpus.data import Corpus, TextOptions, collate_captions

    paths, words = _corpus_with_long_caption(tmp_path)
    cfg = {"tokens": {"start_end": False, "max_words": 30}}
    corpus = Corpus(paths, frozenset(), TextOptions.from_config(cfg))
    item = corpus.caption_item(0)
    assert item["tokens"].tolist() == words[:30]
    batch_ = collate_captions([item, corpus.caption_item(1)])
    assert int(batch_["lengths"][0]) == 30 and batch_["tokens"].shape[1] == 30
    assert len(Corpus(paths).caption_item(0)["tokens"]) == 40                     # no tokens block: all words
    with pytest.raises(ValueError, match="max_words must be >= 1"):
        TextOptions.from_config({"tokens": {"max_words": 0}})


def test_glove_initialises_known_words_and_errors_name_the_file(tmp_path):
    from itmatch.models.bssan import load_glove

    words = ["<pad>", "<start>", "<end>", "<unk>", "dog", "cat", "zebra"]
    glove = tmp_path / "glove.txt"
    glove.write_text("dog 1 2 3\nthe 0 0 0\ncat -1 0.5 2e-1\n", encoding="utf-8")
    w = torch.zeros(len(words), 3)
    assert load_glove(glove, words, w) == 2
    assert w[4].tolist() == [1.0, 2.0, 3.0] and torch.allclose(w[5], torch.tensor([-1.0, 0.5, 0.2]))
    assert w[6].abs().sum() == 0                                                  # not in GloVe: untouched
    with pytest.raises(FileNotFoundError, match=r"models\.bssan\.glove: GloVe file .*missing\.txt does not exist"):
        load_glove(tmp_path / "missing.txt", words, w)
    bad = tmp_path / "bad.txt"
    bad.write_text("x 1\ncat 1 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.txt line 2: 2 values for 'cat', the word vectors have 3"):
        load_glove(bad, words, w)


def test_prepare_training_logs_glove_or_random_init(tmp_path, caplog):
    import logging

    from itmatch.corpus.data import Corpus
    from itmatch.text.vocab import Vocab

    paths, _ = _corpus_with_long_caption(tmp_path)
    corpus = Corpus(paths)
    vocab = Vocab.load(paths.vocab)
    caplog.set_level(logging.INFO)
    m = tiny()
    m.prepare_training(corpus)
    assert "random init (models.bssan.glove is not set)" in caplog.text
    word = vocab.idx2word[5]
    glove = tmp_path / "g.txt"
    glove.write_text(f"{word} " + " ".join(["0.25"] * m.embed.weight.shape[1]) + "\n", encoding="utf-8")
    m = build_model("bssan", {**TINY_CFG, "glove": str(glove)}, {"vocab_size": len(vocab), "feature_dim": FEAT})
    m.prepare_training(corpus)
    assert torch.all(m.embed.weight[5] == 0.25)
    assert f"1 of {len(vocab)} vocabulary words from GloVe {glove}" in caplog.text
    m = build_model("bssan", {**TINY_CFG, "glove": str(tmp_path / "nope.txt")},
                    {"vocab_size": len(vocab), "feature_dim": FEAT})
    with pytest.raises(FileNotFoundError, match="models.bssan.glove"):
        m.prepare_training(corpus)


# ---- published visual inputs (§IV-B): W2R on the VGG-19 conv5_4 grid, O2W on the top-10 objects ------------
def test_o2w_picks_the_top_10_of_36_regions_by_confidence():
    """O2W's objects are the 10 valid regions of highest object_conf, in descending order (values checked), also
    when W2R reads the grid; fewer valid regions than 10 leave padding objects masked out."""
    g = torch.Generator().manual_seed(5)
    R, D = 36, 8
    feats = torch.randn(2, R, D, generator=g)
    conf = torch.rand(2, R, generator=g)
    num = torch.tensor([36, 7])
    valid = torch.arange(R)[None] < num[:, None]
    feats, conf = feats * valid[..., None], conf * valid
    conf[1, 20] = 0.99                                       # a padding region's confidence never counts
    images = {"features": feats, "num_regions": num, "object_conf": conf,
              "grid": torch.rand(2, 196, 16, generator=g)}
    for w2r_input in ("regions", "grid"):
        torch.manual_seed(0)
        m = BSSAN(VOCAB, D, word_dim=8, w2r_hidden=8, w2r_mlp=[4], o2w_hidden=6, o2w_mlp=[4], num_objects=10,
                  w2r_input=w2r_input, grid_dim=16, normalize_regions=False)
        with torch.no_grad():
            img = m.encode_images(images)
        order = sorted(range(R), key=lambda j: -float(conf[0, j]))[:10]
        assert torch.equal(img["O"][0], feats[0, order])
        assert img["omask"][0].all()
        order1 = sorted(range(7), key=lambda j: -float(conf[1, j]))
        assert torch.equal(img["O"][1, :7], feats[1, order1])
        assert img["omask"][1].tolist() == [True] * 7 + [False] * 3
        assert torch.equal(img["R"], images["grid"] if w2r_input == "grid" else feats)


def test_grid_inputs_forward_shapes_and_gradients():
    """W2R over the 196 × 512 conv5_4 grid, O2W over 10 of 36 regions of 2048: shapes of every representation,
    the score matrix and the loss; the grid reaches W2R only, the regions O2W only."""
    g = torch.Generator().manual_seed(1)
    I, C, L = 3, 4, 6
    images = {"features": torch.rand(I, 36, 2048, generator=g), "num_regions": torch.tensor([36, 36, 20]),
              "object_conf": torch.rand(I, 36, generator=g), "grid": torch.rand(I, 196, 512, generator=g).relu(),
              "index": torch.arange(I)}
    lens = torch.tensor([6, 3, 5, 2])
    tok = torch.randint(1, VOCAB, (C, L), generator=g) * (torch.arange(L)[None] < lens[:, None])
    captions = {"tokens": tok, "lengths": lens, "image_index": torch.arange(C) % I}
    cfg = {"word_dim": 12, "w2r_hidden": 16, "w2r_mlp": [8, 4], "o2w_hidden": 10, "o2w_mlp": [8, 6, 4]}
    torch.manual_seed(0)
    m = build_model("bssan", cfg, {"vocab_size": VOCAB, "feature_dim": 2048, "grid_dim": 512}).eval()
    assert m.w2r_input == "grid" and m.w2r_W.shape == (12, 512) and m.o2w_W.shape == (2048, 10)
    assert m.w2r_lstm.input_size == 512 + 12
    img, cap = m.encode_images(images), m.encode_captions(captions)
    assert img["R"].shape == (I, 196, 512) and img["mask"].shape == (I, 196) and img["mask"].all()
    assert img["RW"].shape == (I, 196, 12)
    assert img["O"].shape == (I, 10, 2048) and img["OW"].shape == (I, 10, 10)
    sim = m.score(img, cap)
    assert sim.shape == (I, C) and torch.isfinite(sim).all()
    with torch.no_grad():
        y, y2 = m.pair_scores(img, cap, torch.tensor([0]), torch.tensor([0]))
        other = {**images, "grid": images["grid"].flip(0)}
        yo, y2o = m.pair_scores(m.encode_images(other), cap, torch.tensor([0]), torch.tensor([0]))
    assert not torch.allclose(y, yo) and torch.equal(y2, y2o)   # the grid is W2R's input, not O2W's
    m.train()
    images["grid"].requires_grad_(True)
    images["features"].requires_grad_(True)
    loss, stats = m.loss(images, {**captions, "tokens": tok[:I], "lengths": lens[:I],
                                  "image_index": torch.arange(I)}, criterion=None)
    loss.backward()
    assert images["grid"].grad.abs().sum() > 0 and images["features"].grad.abs().sum() > 0
    assert images["features"].grad[:, :, :].abs().sum(-1).gt(0).sum(1).tolist() == [10, 10, 10]  # 10 objects
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_inputs_follow_w2r_input_and_branches():
    from itmatch.models.registry import model_inputs

    # grid: W2R on the VGG-19 grid; objects: O2W picks its regions by the detector's confidences
    assert model_inputs("bssan", {}) == {"grid", "objects"}                        # the schema's default
    assert model_inputs("bssan", {"w2r_input": "regions"}) == {"objects"}
    assert model_inputs("bssan", {"branches": "o2w"}) == {"objects"}               # no W2R: no grid
    assert model_inputs("bssan", {"branches": "w2r"}) == {"grid"}                  # no O2W: no confidences
    with pytest.raises(KeyError, match="grid_dim"):
        build_model("bssan", {}, {"vocab_size": VOCAB, "feature_dim": FEAT})
    with pytest.raises(KeyError, match=r"images\['grid'\]"):
        BSSAN(VOCAB, FEAT, grid_dim=8).encode_images(batch()[0])
