"""The evaluation's saved outputs: sims.h5 (the fused matrix, streamed in row blocks) and ranks.parquet, and the
metrics computed from them: row-block ranks equal the in-memory reference, the file equals the in-memory fusion,
and on a trained run (session fixture) metrics.json is what the saved matrix gives."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from itmatch.corpus.data import Corpus
from itmatch.corpus.synthetic import write_synthetic_corpus
from itmatch.evaluation.evaluate import evaluate_sims, run_evaluation, similarity, split_rows
from itmatch.evaluation.metrics import (
    evaluate_matrix,
    fold_metrics,
    i2t_ranks,
    matrix_ranks,
    protocols,
    retrieval_metrics,
    t2i_ranks,
)
from itmatch.evaluation.outputs import SimsFile, ranks_table
from itmatch.models.checkpoint import write_checkpoint
from itmatch.models.registry import build_model


def _reference_top(sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = np.nan_to_num(sim, nan=-np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k], np.argsort(-s, axis=0, kind="stable")[:k].T


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block", [1, 3, 1000])
def test_row_block_ranks_equal_the_in_memory_ones(seed, block):
    """Ties (small integer scores), NaN entries, shuffled caption order: every rank and top-k as the reference."""
    rng = np.random.default_rng(seed)
    n_img, per = int(rng.integers(1, 13)), int(rng.integers(1, 6))
    cap_image = rng.permutation(np.repeat(np.arange(n_img), per))
    sim = rng.integers(0, 4, (n_img, n_img * per)).astype(np.float32)
    if seed % 2:
        sim[rng.random(sim.shape) < 0.1] = np.nan
    r = matrix_ranks(lambda a, b: sim[a:b], n_img, cap_image, top=10, block=block)
    np.testing.assert_array_equal(r.i2t, i2t_ranks(sim, cap_image))
    np.testing.assert_array_equal(r.t2i, t2i_ranks(sim, cap_image))
    top_i, top_t = _reference_top(sim, 10)
    np.testing.assert_array_equal(r.i2t_top, top_i)
    np.testing.assert_array_equal(r.t2i_top, top_t)
    np.testing.assert_array_equal(r.i2t_top_score, np.take_along_axis(np.nan_to_num(sim, nan=-np.inf), top_i, 1))
    assert (cap_image[r.i2t_match] == np.arange(n_img)).all()  # the match is one of the image's own captions
    s = np.nan_to_num(sim, nan=-np.inf)
    best = np.array([s[i, cap_image == i].max() for i in range(n_img)])
    np.testing.assert_array_equal(s[np.arange(n_img), r.i2t_match], best)


def test_folds_and_5k_from_row_blocks_equal_the_sub_matrices():
    rng = np.random.default_rng(1)
    n_img, per, folds = 20, 5, 5
    cap_image = np.repeat(np.arange(n_img), per)
    sim = rng.standard_normal((n_img, n_img * per)).astype(np.float32)
    sim[cap_image, np.arange(n_img * per)] += 1.0
    ev = evaluate_matrix(lambda a, b: sim[a:b], n_img, cap_image, folds=folds, full=True)
    assert ev.protocols["1k"] == fold_metrics(sim, cap_image, folds)
    assert ev.protocols["5k"] == retrieval_metrics(sim, cap_image)
    assert ev.protocols == protocols(sim, cap_image, folds=folds, full=True)
    size = n_img // folds
    for k in range(folds):
        cols = np.flatnonzero(cap_image // size == k)
        sub = sim[k * size:(k + 1) * size][:, cols]
        np.testing.assert_array_equal(ev.fold_i2t[k * size:(k + 1) * size], i2t_ranks(sub, cap_image[cols] - k * size))
        np.testing.assert_array_equal(ev.fold_t2i[cols], t2i_ranks(sub, cap_image[cols] - k * size))
    image_ids, caption_ids = np.arange(100, 100 + n_img), np.arange(5000, 5000 + n_img * per)
    t = ranks_table(ev, image_ids, caption_ids, cap_image).to_pandas()
    assert list(t.columns) == ["direction", "query_id", "match_id", "rank", "fold", "fold_rank", "top_ids",
                               "top_scores"]
    i2t, t2i = t[t.direction == "i2t"], t[t.direction == "t2i"]
    np.testing.assert_array_equal(i2t.query_id, image_ids)
    np.testing.assert_array_equal(t2i.match_id, image_ids[cap_image])
    np.testing.assert_array_equal(i2t["rank"], i2t_ranks(sim, cap_image) + 1)
    np.testing.assert_array_equal(t2i["fold"], cap_image // size)
    np.testing.assert_array_equal(np.stack(t2i.top_ids), image_ids[_reference_top(sim, 10)[1]])
    # 1-based ranks: R@K = share of rank ≤ K, medr = floor(median(rank)), as metrics.json (1K: of fold_rank)
    assert 100 * (t2i["rank"] <= 5).mean() == ev.protocols["5k"]["t2i"]["r5"]
    assert np.floor(np.median(i2t["rank"])) == ev.protocols["5k"]["i2t"]["medr"]


def _two_part_checkpoint(path, corpus: Corpus) -> list:
    """A fused PFAN checkpoint (t2i + i2t, untrained: scores are what matters here) and its models."""
    models, parts = [], []
    for i, direction in enumerate(("t2i", "i2t")):
        torch.manual_seed(i)
        cfg = {"embed_dim": 16, "word_dim": 8, "block_dim": 4, "direction": direction}
        m = build_model("pfan", cfg, corpus.info).eval()
        models.append(m)
        parts.append({"name": direction, "config": cfg, "data_info": dict(corpus.info), "state_dict": m.state_dict()})
    write_checkpoint(path, "pfan", parts)
    return models


def test_the_saved_matrix_is_the_in_memory_fusion_and_gives_the_metrics(tmp_path):
    paths = write_synthetic_corpus(tmp_path / "data", n_train=4, n_val=2, n_test=10, R=5, D=16)
    corpus = Corpus(paths, frozenset({"blocks"}))
    models = _two_part_checkpoint(tmp_path / "model.pt", corpus)
    image_rows, caption_rows, cap_image = split_rows(corpus, "test")
    torch.set_num_threads(1)  # as the evaluation below (threads: 1): the same float reductions
    ref = similarity(models[0], corpus, image_rows, caption_rows, image_batch=3, caption_batch=7)
    ref = ref + similarity(models[1], corpus, image_rows, caption_rows, image_batch=3, caption_batch=7)
    ref /= 2
    out = run_evaluation("pfan", str(tmp_path / "model.pt"), corpus, str(tmp_path / "run" / "metrics.json"),
                         {"threads": 1, "image_batch": 3, "caption_batch": 7, "folds": 2, "full": True},
                         {"dataset": "synthetic"}, "v1")
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json", "ranks.parquet", "sims.h5"]
    with h5py.File(run / "sims.h5") as f:
        np.testing.assert_array_equal(f["sims"][:], ref)  # blocks of 3 rows, parts summed in the file
        assert f["sims"].dtype == np.float32 and f["sims"].fletcher32
        np.testing.assert_array_equal(f["image_id"][:], corpus.image_ids[image_rows])
        np.testing.assert_array_equal(f["caption_id"][:], corpus.caption_ids[caption_rows])
        np.testing.assert_array_equal(f["caption_image_id"][:], corpus.image_ids[image_rows][cap_image])
        assert f.attrs["parts"] == 2 and f.attrs["fusion"] == "mean" and f.attrs["split"] == "test"
        assert f.attrs["model"] == "pfan" and f.attrs["folds"] == 2
    assert out["protocols"] == protocols(ref, cap_image, folds=2, full=True)
    assert json.loads((run / "metrics.json").read_text())["protocols"] == out["protocols"]
    ranks = pd.read_parquet(run / "ranks.parquet")
    assert len(ranks) == len(image_rows) + len(caption_rows)
    with SimsFile(run / "sims.h5") as sims:
        np.testing.assert_array_equal(sims.cap_image, cap_image)
        assert evaluate_sims(run / "sims.h5", 2, True).protocols == out["protocols"]


@pytest.mark.slow
def test_metrics_json_is_what_the_saved_matrix_gives(trained_pfan):
    """On the trained run: every recall, medr and meanr recomputed from sims.h5 (with the in-memory reference
    functions) is metrics.json's, and ranks.parquet's ranks and top-10 are the matrix's."""
    workdir, _ = trained_pfan
    run = workdir / "results/pfan/shapes"
    metrics = json.loads((run / "metrics.json").read_text())
    with h5py.File(run / "sims.h5") as f:
        sim, image_ids, caption_ids = f["sims"][:], f["image_id"][:], f["caption_id"][:]
        cap_image_ids = f["caption_image_id"][:]
    assert sim.shape == (metrics["n_images"], metrics["n_captions"]) == (20, 100)
    images = pd.read_parquet(workdir / "results/data/shapes/images.parquet")
    captions = pd.read_parquet(workdir / "results/data/shapes/captions.parquet")
    np.testing.assert_array_equal(image_ids, images.image_id[images.split == "test"])
    np.testing.assert_array_equal(caption_ids, captions.caption_id[captions.split == "test"])
    cap_image = np.searchsorted(image_ids, cap_image_ids)
    assert (image_ids[cap_image] == cap_image_ids).all()
    i2t, t2i = i2t_ranks(sim, cap_image), t2i_ranks(sim, cap_image)
    one = metrics["protocols"]["1k"]
    assert one["i2t"]["r1"] == 100 * (i2t < 1).mean() and one["t2i"]["r1"] == 100 * (t2i < 1).mean()
    assert one == {**retrieval_metrics(sim, cap_image), "folds": 1}
    assert one["rsum"] > 250  # trained: chance is ≈ 160 on 20 images
    ranks = pd.read_parquet(run / "ranks.parquet")
    r_i, r_t = ranks[ranks.direction == "i2t"], ranks[ranks.direction == "t2i"]
    np.testing.assert_array_equal(r_i.query_id, image_ids)
    np.testing.assert_array_equal(r_t.query_id, caption_ids)
    np.testing.assert_array_equal(r_i["rank"], i2t + 1)
    np.testing.assert_array_equal(r_t["rank"], t2i + 1)
    np.testing.assert_array_equal(r_t.fold_rank, r_t["rank"])
    top_i, top_t = _reference_top(sim, 10)
    np.testing.assert_array_equal(np.stack(r_i.top_ids), caption_ids[top_i])
    np.testing.assert_array_equal(np.stack(r_t.top_ids), image_ids[top_t])
    np.testing.assert_array_equal(np.stack(r_t.top_scores), np.take_along_axis(sim.T, top_t, 1))
    col = {int(c): j for j, c in enumerate(caption_ids)}
    best = [sim[i, [col[int(c)] for c in caption_ids[cap_image == i]]].max() for i in range(len(image_ids))]
    np.testing.assert_array_equal([sim[i, col[int(m)]] for i, m in enumerate(r_i.match_id)], best)


def test_a_caption_budget_scores_in_groups_with_the_same_result(tmp_path, caplog):
    """evaluation.max_caption_mb smaller than the encoded captions: captions are scored in groups (images re-encoded
    per group) and the matrix, in memory and in sims.h5 with two fused parts, is the same as in one pass."""
    paths = write_synthetic_corpus(tmp_path / "data", n_train=4, n_val=2, n_test=10, R=5, D=16)
    corpus = Corpus(paths, frozenset({"blocks"}))
    models = _two_part_checkpoint(tmp_path / "model.pt", corpus)
    image_rows, caption_rows, _ = split_rows(corpus, "test")
    torch.set_num_threads(1)
    whole = similarity(models[0], corpus, image_rows, caption_rows, image_batch=3, caption_batch=7)
    budget = 1e-3  # MB: a group per caption chunk (7 captions × ≤ 9 words × 16 dims × 4 B > 1 kB)
    with caplog.at_level("INFO", logger="itmatch"):
        grouped = similarity(models[0], corpus, image_rows, caption_rows, image_batch=3, caption_batch=7,
                             max_caption_mb=budget)
    np.testing.assert_array_equal(grouped, whole)
    assert "captions 0..7 " in caplog.text and "scored as one group" in caplog.text
    cfg = {"threads": 1, "image_batch": 3, "caption_batch": 7, "folds": 1, "full": False}
    for name, mb in (("one", None), ("groups", budget)):
        run_evaluation("pfan", str(tmp_path / "model.pt"), corpus, str(tmp_path / name / "metrics.json"),
                       {**cfg, "max_caption_mb": mb}, {"dataset": "synthetic"}, "v1")
    with h5py.File(tmp_path / "one" / "sims.h5") as a, h5py.File(tmp_path / "groups" / "sims.h5") as b:
        np.testing.assert_array_equal(a["sims"][:], b["sims"][:])
