"""`itmatch retrieve` for models that need more than tokens for a new sentence: SMFEA's referral tree (reused for a
dataset caption, refused for a new one under a gold parser or without stanza models) and GLFN's BERT vectors
(computed with the dataset's BERT, refused when it is missing). Untrained models on a synthetic corpus laid out
as the workflow lays out `shapes`; what is checked is the input handling and that a dataset caption gets its
evaluation scores."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.corpus.data import Corpus, DataPaths
from itmatch.corpus.synthetic import write_synthetic_corpus
from itmatch.evaluation.evaluate import similarity, split_rows
from itmatch.models.checkpoint import write_checkpoint
from itmatch.models.registry import build_model, model_inputs
from itmatch.retrieve import LAYOUT, RetrieveError, Retriever
from tests.conftest import REPO
from tests.test_smfea_glfn_train import _extend

CONFIG = str(REPO / "config" / "config.yaml")
TINY = {"smfea": {"embed_dim": 16, "word_dim": 8, "node_input_dim": 8, "hidden_dim": 8,
                  "beta_t": 0.4, "beta_c": 0.0},  # Table 6 [0.6, 0.4, 0]: this corpus has no concepts.h5
        "glfn": {"embed_dim": 16, "block_dim": 8, "word_dim": 8}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """results/{data,text,features}/shapes/ of a synthetic corpus with trees, 384-d BERT vectors (the size of the
    configured shapes BERT) and tags."""
    src = tmp_path_factory.mktemp("syn")
    paths = _extend(write_synthetic_corpus(src, n_train=8, n_val=2, n_test=6, R=5, D=16), src, H=384)
    (src / "tree_vocab.json").rename(src / "tree_vocab.kept")
    work = tmp_path_factory.mktemp("work")
    for name, (sub, fname) in LAYOUT.items():
        if getattr(paths, name) is None:  # (concepts, grid: not written for this corpus)
            continue
        dst = work / "results" / sub / "shapes" / fname
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(getattr(paths, name), dst)
    shutil.copy(src / "tree_vocab.kept", work / "results/text/shapes/tree_vocab.json")
    return work


def _run(work: Path, name: str) -> tuple[Path, Corpus, torch.nn.Module]:
    """results/<name>/shapes/model.pt of an untrained model, the corpus and the model."""
    paths = DataPaths(**{k: str(work / "results" / sub / "shapes" / f) for k, (sub, f) in LAYOUT.items()})
    corpus = Corpus(paths, model_inputs(name, TINY[name]))
    torch.manual_seed(0)
    model = build_model(name, TINY[name], corpus.info).eval()
    run = work / "results" / name / "shapes"
    run.mkdir(parents=True, exist_ok=True)
    write_checkpoint(run / "model.pt", name, [{"name": "", "config": TINY[name], "data_info": dict(corpus.info),
                                                "state_dict": model.state_dict()}])
    return run, corpus, model


def _override(tmp_path: Path, text: str) -> str:
    path = tmp_path / "override.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _dataset_caption_scores(corpus, model, r: Retriever, k: int = 0):
    """A test caption as a query: the retrieved scores and the caption's column of the evaluation's matrix."""
    image_rows, caption_rows, _ = split_rows(corpus, "test")
    sim = similarity(model, corpus, image_rows, caption_rows)
    text = str(r.caption_text[caption_rows[k]])
    res = r.text(text, k=len(image_rows))
    got = {h.image_id: h.score for h in res.hits}
    return np.array([got[int(i)] for i in corpus.image_ids[image_rows]]), sim[:, k], res


def test_smfea_reuses_a_dataset_captions_tree_and_refuses_a_new_sentence_under_gold(workdir, tmp_path):
    run, corpus, model = _run(workdir, "smfea")
    r = Retriever(run, device="cpu", config_path=CONFIG)
    got, want, res = _dataset_caption_scores(corpus, model, r)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert res.query["dataset_caption_ids"]
    with pytest.raises(RetrieveError, match=r"smfea reads the referral tree of a caption, and dataset shapes takes "
                                            r"them from gold parses \(config key text\.trees\.parser\.shapes: gold\)"):
        r.text("w1 w2 w3 w1 w2 w3 w1", k=3)


def test_smfea_without_stanza_models_names_them(workdir, tmp_path):
    run, _, _ = _run(workdir, "smfea")
    over = _override(tmp_path, f"text: {{trees: {{parser: {{shapes: stanza}}, stanza_dir: {tmp_path / 'none'}}}}}\n")
    r = Retriever(run, device="cpu", config_path=CONFIG, configfiles=[over])
    with pytest.raises(RetrieveError, match=r"smfea reads the referral tree of a caption: .*none"):
        r.text("w1 w2 w3 w1 w2 w3 w1", k=3)


def test_glfn_computes_bert_vectors_of_a_new_sentence(workdir, tmp_path):
    run, corpus, model = _run(workdir, "glfn")
    r = Retriever(run, device="cpu", config_path=CONFIG)
    got, want, _ = _dataset_caption_scores(corpus, model, r)  # stored vectors for a dataset caption
    np.testing.assert_allclose(got, want, atol=1e-5)
    res = r.text("w1 w2 w3 w1 w2 w3 w1", k=3)  # new: BERT vectors from the configured shapes BERT
    assert len(res.hits) == 3 and "dataset_caption_ids" not in res.query
    assert all(np.isfinite(h.score) for h in res.hits)
    over = _override(tmp_path, f"text: {{bert: {{dataset_model: {{shapes: {tmp_path / 'nobert'}}}}}}}\n")
    r = Retriever(run, device="cpu", config_path=CONFIG, configfiles=[over])
    with pytest.raises(RetrieveError, match=r"glfn reads BERT vectors of a new query, and the model is missing: "
                                            r"config key text\.bert\.model: no BERT model"):
        r.text("w1 w2 w3 w1 w2 w3 w1", k=3)
