"""SMFEA's CAC branch (CVSE): the concept stage against hand-computed values, the GCN branch's shapes and
gradients, GloVe errors, the workflow wiring (concept stage only with β_c > 0) and a short training run."""

from __future__ import annotations

import json
import math
import types

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, TEST_CONFIG, run_snakemake

from itmatch.models.concepts import ConsensusConcepts, concept_kl, normalized_adjacency
from itmatch.models.smfea import SMFEA
from itmatch.text import concepts as tc
from itmatch.training.loss import ContrastiveLoss

SHARES = {"noun": 0.7, "adjective": 0.2, "verb": 0.1}
# four train captions as (tag, lemma): "a dog runs on grass", "dogs on the grass", "a cat on grass", "a dog"
TRAIN = [[("DT", "a"), ("NN", "dog"), ("VBZ", "run"), ("IN", "on"), ("NN", "grass")],
         [("NNS", "dog"), ("IN", "on"), ("DT", "the"), ("NN", "grass")],
         [("DT", "a"), ("NN", "cat"), ("IN", "on"), ("NN", "grass")],
         [("DT", "a"), ("NN", "dog")]]


def test_vocabulary_labels_and_correlation_match_hand_computation():
    test_caption = [("DT", "a"), ("JJ", "brown"), ("NN", "run"), ("IN", "by"), ("NNS", "dog")]   # not train
    built = tc.build_concepts(TRAIN + [test_caption], np.array([True] * 4 + [False]),
                           {"num_concepts": 10, "pos_shares": SHARES})
    # nouns by caption count then name (dog 3, grass 3, cat 1), then verbs (run 1); no adjective in train
    assert built["names"] == ["dog", "grass", "cat", "run"]
    assert built["pos"] == ["noun", "noun", "noun", "verb"]
    assert built["labels"] == [[0, 1, 3], [0, 1], [1, 2], [0], [0, 3]]   # lemma match whatever the tag
    np.testing.assert_array_equal(built["counts"], [3, 3, 1, 1])
    np.testing.assert_array_equal(built["cooccurrence"], [[0, 2, 0, 1], [2, 0, 1, 1], [0, 1, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_allclose(built["conditional"], [[0, 2 / 3, 0, 1 / 3], [2 / 3, 0, 1 / 3, 1 / 3],
                                                      [0, 1, 0, 0], [1, 1, 0, 0]])
    # every nonzero P is >= 1/3, and 5^(1/3 - 0.02) - 5^-0.02 = 0.69 >= 0.3: binary A = (P > 0); column sums of
    # A are 2, 3, 1, 2; A · 0.25 / column sum + I
    w = 0.25
    expected = np.array([[1, w / 3, 0, w / 2], [w / 2, 1, w / 1, w / 2], [0, w / 3, 1, 0], [w / 2, w / 3, 0, 1]])
    np.testing.assert_allclose(built["correlation"], expected, rtol=1e-5)


def test_threshold_and_reweighting_by_hand():
    counts = np.array([10, 2])
    co = np.array([[0, 1], [1, 0]])                  # P = [[0, 0.1], [0.5, 0]]
    f = [5 ** (p - 0.02) - 5 ** -0.02 for p in (0.1, 0.5)]
    assert f[0] < 0.3 <= f[1]                        # 0.169 is cut, 1.197 kept
    a = tc.correlation_matrix(co, counts, threshold=0.3, rescale_base=5, rescale_offset=0.02, reweight=0.25)
    np.testing.assert_allclose(a, [[1, 0], [0.25 / (1 + 1e-6), 1]])
    # a lower threshold keeps both edges; each column has one entry
    a = tc.correlation_matrix(co, counts, threshold=0.1, rescale_base=5, rescale_offset=0.02, reweight=0.25)
    np.testing.assert_allclose(a, [[1, 0.25 / (1 + 1e-6)], [0.25 / (1 + 1e-6), 1]])


def test_a_captions_concept_labels_from_its_gold_parse():
    ptb = ("(ROOT (S (NP (DT A) (JJ brown) (NNS dogs)) (VP (VBP are) (VP (VBG running) (PP (IN on) "
           "(NP (DT the) (NN grass))))) (. .)))")
    lemmas = ["a", "brown", "dog", "be", "run", "on", "the", "grass", "."]
    tagged = tc.gold_tags(ptb, lemmas)
    assert tagged[2] == ("NNS", "dog") and tagged[4] == ("VBG", "run")
    index = {"grass": 0, "dog": 1, "cat": 2, "brown": 3, "run": 4}
    assert tc.caption_concepts((lem for _, lem in tagged), index) == [0, 1, 3, 4]


def test_shares_cap_and_class_of_a_lemma():
    tagged = [[("NN", "walk"), ("JJ", "red")], [("VB", "walk"), ("JJ", "red")], [("NN", "walk"), ("JJ", "big")]]
    names, pos, counts = tc.select_concepts(tagged, 10, SHARES)
    # walk: noun twice, verb once → a noun; 2 adjective slots; the verb class is empty
    assert (names, pos, counts) == (["walk", "red", "big"], ["noun", "adjective", "adjective"], [2, 2, 1])
    assert tc.select_concepts(tagged, 5, SHARES)[0] == ["walk", "red"]            # round(0.2 · 5) = 1 adjective
    with pytest.raises(ValueError, match="unknown classes"):
        tc.select_concepts(tagged, 5, {"adverb": 1.0})


def test_make_concepts_on_shapes_writes_the_contract_layout(tiny_shapes, tmp_path):
    data = json.loads((tiny_shapes / "dataset_shapes.json").read_text())
    rows = [(s["sentid"], img["imgid"], img["split"], s["raw"]) for img in data["images"] for s in img["sentences"]]
    caps = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"caption_id": pa.array([r[0] for r in rows], pa.int64()),
                             "image_id": pa.array([r[1] for r in rows], pa.int64()),
                             "split": [r[2] for r in rows], "text": [r[3] for r in rows]}), caps)
    out = tmp_path / "concepts.h5"
    built = tc.make_concepts(caps, out, parser="gold", json_path=tiny_shapes / "dataset_shapes.json")
    K = len(built["names"])
    assert 2 <= K < 300 and {"circle", "square"} & set(built["names"])   # capped by what the captions have
    with h5py.File(out) as f:
        assert [n.decode() for n in f["names"][:]] == built["names"]
        offs, idx = f["label_offsets"][:], f["label_index"][:]
        np.testing.assert_array_equal(f["caption_id"][:], [r[0] for r in rows])
        assert f["correlation"].shape == (K, K) and f["correlation"].dtype == np.float32
        np.testing.assert_allclose(np.diag(f["correlation"][:]), 1.0)
        train = np.array([r[2] == "train" for r in rows])
        lab = np.zeros((len(rows), K), np.int64)
        for i in range(len(rows)):
            lab[i, idx[offs[i]:offs[i + 1]]] = 1
        t = lab[train]
        np.testing.assert_array_equal(f["counts"][:], t.sum(0))                   # per caption, train only
        co = t.T @ t
        np.fill_diagonal(co, 0)
        np.testing.assert_array_equal(f["cooccurrence"][:], co)
        assert json.loads(f.attrs["settings"])["num_concepts"] == 300 and f.attrs["source"] == "gold"
    with pytest.raises(ValueError, match="no train captions"):
        tc.build_concepts([[("NN", "dog")]], np.array([False]))


def test_stanza_path_with_a_stand_in_pipeline(tmp_path, monkeypatch):
    """The concept stage on stanza's tags and lemmas (a stand-in for stanza: no models here): tokenize,pos,lemma
    only, every sentence of a caption, batches in order."""
    import sys

    class Word:
        def __init__(self, text):
            self.text = text
            self.xpos = {"dogs": "NNS", "dog": "NN", "grass": "NN", "runs": "VBZ", "brown": "JJ"}.get(text, "DT")
            self.lemma = {"dogs": "dog", "runs": "run"}.get(text, text)

    class Document:
        def __init__(self, sentences, text=None):
            self.text, self.sentences = text, []

    class Pipeline:
        calls: list[int] = []

        def __init__(self, lang, dir, processors, download_method, **kw):
            assert processors == "tokenize,pos,lemma" and download_method is None
            assert "constituency_batch_size" not in kw

        def bulk_process(self, docs):
            Pipeline.calls.append(len(docs))
            for d in docs:
                d.sentences = [types.SimpleNamespace(words=[Word(w) for w in s.split()]) for s in d.text.split(". ")]
            return docs

    monkeypatch.setitem(sys.modules, "stanza", types.SimpleNamespace(Pipeline=Pipeline, Document=Document))
    (tmp_path / "en").mkdir()
    (tmp_path / "resources.json").write_text("{}")
    texts = ["a dog runs. the grass", "dogs", "a brown dog", "the grass"]
    pq.write_table(pa.table({"caption_id": pa.array([1, 2, 3, 4], pa.int64()), "image_id": pa.array([1, 1, 2, 2]),
                             "split": ["train", "train", "train", "test"], "text": texts}), tmp_path / "c.parquet")
    built = tc.make_concepts(tmp_path / "c.parquet", tmp_path / "concepts.h5", parser="stanza", stanza_dir=tmp_path,
                             stanza_batch_size=3, device="cpu", settings={"num_concepts": 10})
    assert Pipeline.calls == [3, 1]
    assert built["names"] == ["dog", "grass", "brown", "run"] and built["pos"] == ["noun", "noun", "adjective", "verb"]
    assert built["labels"] == [[0, 1, 3], [0], [0, 2], [1]]   # the second sentence of caption 1 counts too


# ---- the model branch ---------------------------------------------------------------------------------------

def test_normalized_adjacency_is_cvse_gen_adj():
    a = torch.tensor([[1.0, 0.5, 0.0], [0.25, 1.0, 0.125], [0.0, 0.5, 1.0]])
    d = torch.diag(a.sum(1).pow(-0.5))
    torch.testing.assert_close(normalized_adjacency(a), (a @ d).t() @ d)


def test_consensus_branch_by_hand_and_kl():
    torch.manual_seed(0)
    cac = ConsensusConcepts(n_concepts=5, embed_dim=8, concept_dim=6, label_ratio=0.35, smooth=10.0).eval()
    x = torch.randn(3, 8)
    labels = torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]])
    c = cac.concept_features()
    assert c.shape == (5, 8)
    torch.testing.assert_close(c.norm(dim=1), torch.ones(5))
    with torch.no_grad():
        sc, q = cac.encode_textual(x, labels)
        vc, log_p = cac.encode_visual(x)
    p = (10 * cac.textual(torch.nn.functional.normalize(x, dim=1), c)).softmax(-1)
    y = (10 * labels).softmax(-1)
    torch.testing.assert_close(q, 0.35 * y + 0.65 * p)
    torch.testing.assert_close(sc, torch.nn.functional.normalize(q @ c, dim=1))
    assert vc.shape == (3, 8) and log_p.shape == (3, 5)
    expected = sum(float(q[i, k]) * (math.log(float(q[i, k])) - float(log_p[i, k])) for i in range(3) for k in range(5))
    assert float(concept_kl(q, log_p)) == pytest.approx(expected, rel=1e-5)
    assert float(concept_kl(log_p.exp(), log_p)) == pytest.approx(0.0, abs=1e-5)


DATA = dict(vocab_size=30, feature_dim=12, n_entities=9, n_relations=4, n_concepts=6)
TINY = dict(embed_dim=16, word_dim=8, node_input_dim=10, hidden_dim=6, concept_dim=7)


def _batch(B: int = 4, K: int = 6):
    g = torch.Generator().manual_seed(1)
    images = {"features": torch.randn(B, 5, 12, generator=g), "num_regions": torch.tensor([5, 3, 4, 5][:B])}
    labels = (torch.rand(B, K, generator=g) > 0.5).float()
    captions = {"tokens": torch.randint(4, 30, (B, 6), generator=g), "lengths": torch.tensor([6, 4, 5, 2][:B]),
                "tree_labels": torch.randint(-1, 4, (B, 7), generator=g), "concept_labels": labels,
                "image_concept_labels": labels.clamp(min=(torch.rand(B, K, generator=g) > 0.7).float())}
    return images, captions


def _corpus(K: int = 6):
    corr = np.eye(K, dtype=np.float32) + 0.1 * (np.arange(K)[:, None] == (np.arange(K)[None, :] + 1) % K)
    return types.SimpleNamespace(concept_correlation=corr, concept_names=[f"c{k}" for k in range(K)],
                                 paths=types.SimpleNamespace(concepts="concepts.h5"))


def test_smfea_with_cac_shapes_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = SMFEA.from_config(TINY, DATA)
    model.prepare_training(_corpus())
    assert model.cfg["beta_c"] == 0.2 and model.inputs(TINY) == {"trees", "concepts"}
    images, captions = _batch()
    vf, v_ent, v_rel, vc, log_p = model._images(images)
    sf, s_ent, s_rel, sc, q = model._captions(captions)
    assert vf.shape == sf.shape == vc.shape == sc.shape == (4, 16) and log_p.shape == q.shape == (4, 6)
    loss, logs = model.loss(images, captions, ContrastiveLoss(0.2, max_violation=False))
    assert {"rank_loss", "ce_loss", "kl_loss", "concept_kl_loss"} <= set(logs)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    # the graph is the installed correlation matrix (a buffer, saved with the checkpoint), not learned
    assert "cac.correlation" in model.state_dict() and "cac.correlation" not in dict(model.named_parameters())
    # training uses the image's labels, evaluation the caption's own
    model.eval()
    q_eval = model._captions(captions)[4]
    model.train()
    assert not torch.allclose(q_eval, model._captions(captions)[4])


def test_beta_c_zero_needs_no_concepts():
    cfg = {**TINY, "beta_c": 0.0, "beta_t": 0.4}
    assert SMFEA.inputs(cfg) == {"trees"}
    data = {k: v for k, v in DATA.items() if k != "n_concepts"}
    model = SMFEA.from_config(cfg, data)
    assert not hasattr(model, "cac")
    images, captions = _batch()
    for key in ("concept_labels", "image_concept_labels"):
        captions.pop(key)
    loss, logs = model.loss(images, captions, ContrastiveLoss(0.2))
    assert "concept_kl_loss" not in logs and torch.isfinite(loss)
    with pytest.raises(KeyError, match="n_concepts"):
        SMFEA.from_config(TINY, data)


def test_glove_initialises_concepts_and_bad_files_stop_before_training(tmp_path):
    torch.manual_seed(0)
    glove = tmp_path / "glove.txt"
    glove.write_text("c1 " + " ".join(["0.5"] * 7) + "\nthe 1 2\nc4 " + " ".join(["-1"] * 7) + "\n", encoding="utf-8")
    model = SMFEA.from_config({**TINY, "glove": str(glove)}, DATA)
    before = model.cac.embeddings.clone()
    model.prepare_training(_corpus())
    emb = model.cac.embeddings
    assert torch.equal(emb[1], torch.full((7,), 0.5)) and torch.equal(emb[4], torch.full((7,), -1.0))
    assert torch.equal(emb[0], before[0])                                  # not in GloVe: random init kept
    missing = tmp_path / "nowhere" / "glove.840B.300d.txt"
    with pytest.raises(FileNotFoundError, match=r"models\.smfea\.glove: GloVe file .*nowhere/glove\.840B\.300d\.txt "
                                                r"does not exist"):
        SMFEA.from_config({**TINY, "glove": str(missing)}, DATA).prepare_training(_corpus())
    bad = tmp_path / "glove.100d.txt"
    bad.write_text("c0 " + " ".join(["1"] * 100) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"glove\.100d\.txt line 1: 100 values for 'c0', the word vectors have 7 "
                                         r"\(models\.smfea\.concept_dim\); expected lines 'word v1 … v7'"):
        SMFEA.from_config({**TINY, "glove": str(bad)}, DATA).prepare_training(_corpus())
    none = tmp_path / "other.txt"
    none.write_text("zebra " + " ".join(["1"] * 7) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"none of the 6 concepts .* is in the GloVe file .*other\.txt"):
        SMFEA.from_config({**TINY, "glove": str(none)}, DATA).prepare_training(_corpus())


def test_graph_of_the_wrong_size_is_refused():
    model = SMFEA.from_config(TINY, DATA)
    with pytest.raises(ValueError, match=r"concepts\.h5: correlation has shape \(5, 5\), the model has 6 concepts"):
        model.prepare_training(_corpus(K=5))


# ---- workflow and a short training run ------------------------------------------------------------------------

def test_dry_run_schedules_the_concept_stage_only_with_cac(tmp_path):
    target = "results/smfea/shapes/metrics.json"
    with_cac = run_snakemake(tmp_path, "-n", target)
    assert "rule concepts:" in with_cac.stdout and "results/text/shapes/concepts.h5" in with_cac.stdout
    ablation = tmp_path / "ablation.yaml"
    ablation.write_text("models: {smfea: {beta_c: 0.0, beta_t: 0.4}}\n", encoding="utf-8")
    without = run_snakemake(tmp_path, "-n", target, "--configfile", str(REPO / "config" / "config.yaml"),
                            str(TEST_CONFIG), str(ablation))
    assert "rule concepts:" not in without.stdout and "concepts.h5" not in without.stdout
    assert "rule referral_trees:" in without.stdout


@pytest.mark.slow
def test_short_training_with_cac_learns(tmp_path):
    """SMFEA with CAC through the shared training loop on the synthetic corpus (concepts = its caption words):
    the loss falls and test retrieval is above chance."""
    from test_smfea_glfn_train import _extend

    from itmatch.corpus.data import Corpus
    from itmatch.corpus.synthetic import write_synthetic_corpus
    from itmatch.evaluation.evaluate import evaluate_checkpoint
    from itmatch.training.loop import train_model

    root = tmp_path / "data"
    paths = _extend(write_synthetic_corpus(root, n_train=40, n_val=10, n_test=10), root)   # with concepts.h5
    cfg = {"embed_dim": 32, "word_dim": 16, "node_input_dim": 16, "hidden_dim": 8, "concept_dim": 16}
    corpus = Corpus(paths, SMFEA.inputs(cfg))
    assert corpus.info["n_concepts"] > 2
    item = corpus.caption_item(0)
    assert item["concept_labels"].sum() >= 1 and (item["image_concept_labels"] >= item["concept_labels"]).all()
    torch.manual_seed(0)
    best = train_model("smfea", cfg, {"num_workers": 0, "device": "cpu", "precision": "fp32", "epochs": 4,
                                      "batch_size": 16, "lr": 2e-3, "val_max_images": 10, "warmup_epochs": 1},
                       corpus, tmp_path / "model.pt", tmp_path / "log.csv", tmp_path / "state.pt")
    log = [line.split(",") for line in (tmp_path / "log.csv").read_text().splitlines()]
    head, rows = log[0], log[1:]
    losses = [float(r[head.index("loss")]) for r in rows]
    assert losses[-1] < losses[0], losses
    prot, n_img, n_cap = evaluate_checkpoint(str(tmp_path / "model.pt"), corpus, split="test")
    assert (n_img, n_cap) == (10, 50)
    # chance rSum on 10 images with 5 captions each: i2t 10 + 42.3 + 68.9, t2i 10 + 50 + 100 = 281.2
    # (measured: val 280 after epoch 0 → 400 after epoch 3, test 344)
    assert best["val_rsum"] > 330 and prot["1k"]["rsum"] > 310, prot["1k"]
