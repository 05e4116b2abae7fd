"""`itmatch retrieve` on a trained tiny PFAN (session fixture `trained_pfan`): text → images, image id or file →
captions, the same scores as the evaluation's sims.h5, and clear messages for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

from itmatch.cli import main
from itmatch.retrieve import Retriever

RUN = "results/pfan/shapes"


def cli(workdir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "itmatch.cli", "retrieve", *args], cwd=workdir, capture_output=True,
                          text=True, timeout=600)


def config_args(files: list[str]) -> list[str]:
    return ["--config", files[0], *(a for f in files[1:] for a in ("--configfile", f))]


@pytest.fixture(scope="module")
def saved(trained_pfan):
    """The evaluation's test matrix, its ids, the captions and the per-query ranks of the trained run."""
    workdir, _ = trained_pfan
    with h5py.File(workdir / RUN / "sims.h5") as f:
        sims, image_ids, caption_ids = f["sims"][:], f["image_id"][:], f["caption_id"][:]
    captions = pd.read_parquet(workdir / "results/data/shapes/captions.parquet").set_index("caption_id")
    ranks = pd.read_parquet(workdir / RUN / "ranks.parquet")
    return sims, image_ids, caption_ids, captions, ranks


@pytest.mark.slow
def test_text_query_prints_k_images_with_the_true_one_first(trained_pfan, saved):
    workdir, _ = trained_pfan
    _, _, _, captions, ranks = saved
    best = ranks[(ranks.direction == "t2i") & (ranks["rank"] == 1)].iloc[0]  # a caption the model gets right
    text, true_image = captions.loc[int(best.query_id), "text"], int(best.match_id)
    table = cli(workdir, RUN, "--text", text, "--k", "5")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == f'pfan on shapes (test split), text "{text}"' and lines[1].split()[:3] == ["rank", "score",
                                                                                                    "image_id"]
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 5 and [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
    assert int(rows[0][2]) == true_image
    out = cli(workdir, RUN, "--text", text, "--k", "5", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["model"] == "pfan" and doc["dataset"] == "shapes" and doc["split"] == "test" and doc["k"] == 5
    assert doc["query"]["text"] == text and doc["query"]["unknown_words"] == []
    assert int(best.query_id) in doc["query"]["dataset_caption_ids"]
    hits = doc["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5] and hits[0]["image_id"] == true_image
    assert [h["image_id"] for h in hits] == [int(r[2]) for r in rows]
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:], strict=False))
    assert hits[0]["file"].startswith("test/") and hits[0]["text"]


@pytest.mark.slow
def test_text_scores_are_the_evaluations_and_the_true_image_ranks_high(trained_pfan, saved):
    """Every test caption as a query: its scores are its column of sims.h5, and its image ranks far better than
    chance (mean rank ≤ 8 of 20; a random model's is 10.5)."""
    workdir, _ = trained_pfan
    sims, image_ids, caption_ids, captions, _ = saved
    r = Retriever(workdir / RUN, device="cpu")
    true_rank = []
    for j, cid in enumerate(caption_ids):
        res = r.text(captions.loc[int(cid), "text"], k=len(image_ids))
        got = {h.image_id: h.score for h in res.hits}
        np.testing.assert_allclose([got[int(i)] for i in image_ids], sims[:, j], rtol=0, atol=1e-5)
        true_rank.append(next(h.rank for h in res.hits if h.image_id == int(captions.loc[int(cid), "image_id"])))
    assert np.mean(true_rank) <= 8.0, np.mean(true_rank)


@pytest.mark.slow
def test_image_id_and_image_file_return_the_same_captions(trained_pfan, saved, capsys, tmp_path):
    workdir, files = trained_pfan
    sims, image_ids, caption_ids, _, ranks = saved
    best = ranks[(ranks.direction == "i2t") & (ranks["rank"] == 1)].iloc[0]
    image_id = int(best.query_id)
    assert main(["retrieve", str(workdir / RUN), "--image", str(image_id), "--k", "5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["query"] == {"image_id": image_id, "file": doc["query"]["file"], "split": "test"}
    hits = doc["results"]
    assert len(hits) == 5 and hits[0]["caption_id"] == int(best.match_id) and hits[0]["match"] is True
    assert all(h["match"] == (h["image_id"] == image_id) for h in hits)
    row = sims[list(image_ids).index(image_id)]
    want = np.argsort(-row, kind="stable")[:5]
    assert [h["caption_id"] for h in hits] == [int(caption_ids[j]) for j in want]
    np.testing.assert_allclose([h["score"] for h in hits], row[want], rtol=0, atol=1e-6)
    # the same image as a new file: extracted with the dataset's detector (needs the run's configuration)
    src = workdir / "resources/shapes/images" / doc["query"]["file"]
    copy = tmp_path / "query image.jpg"
    shutil.copy(src, copy)
    assert main(["retrieve", str(workdir / RUN), "--image", str(copy), "--k", "5", "--json",
                 *config_args(files)]) == 0
    new = json.loads(capsys.readouterr().out)
    assert new["query"] == {"file": str(copy)}
    assert [h["caption_id"] for h in new["results"]] == [h["caption_id"] for h in hits]
    np.testing.assert_allclose([h["score"] for h in new["results"]], [h["score"] for h in hits], atol=1e-4)
    assert all("match" not in h for h in new["results"])
    # without the configuration, a new file is refused with the reason
    assert main(["retrieve", str(workdir / RUN), "--image", str(copy)]) == 2
    assert "needs the workflow's configuration" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["results/nope/shapes", "--text", "a circle"], "RUN results/nope/shapes: no such folder"),
    (["{run}", "--image", "123456789"], "--image '123456789': neither an image file nor an image id of dataset "
                                        "shapes"),
    (["{run}", "--text", "a circle", "--k", "0"], "--k must be at least 1, got 0"),
    (["{run}", "--text", "a circle", "--split", "tset"], "--split 'tset': dataset shapes has the splits test, "
                                                         "train, val"),
    (["{run}", "--text", " "], "--text has no words"),
    (["{workdir}/results", "--text", "a circle"], "no model.pt in it"),
])
def test_bad_input_is_named(trained_pfan, capsys, args, message):
    workdir, _ = trained_pfan
    args = [a.format(run=workdir / RUN, workdir=workdir) for a in args]
    assert main(["retrieve", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_unknown_words_are_reported(trained_pfan, capsys):
    workdir, _ = trained_pfan
    assert main(["retrieve", str(workdir / RUN), "--text", "a red zebra", "--k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "words outside the vocabulary (read as <unk>): zebra" and len(out) == 3 + 3


def test_help_and_one_query_kind(capsys):
    with pytest.raises(SystemExit) as e:
        main(["retrieve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(opt in out for opt in ("--text", "--image", "--k", "--split", "--json", "RUN"))
    with pytest.raises(SystemExit):
        main(["retrieve", "results/pfan/shapes", "--text", "a", "--image", "1"])
    assert "not allowed with argument" in capsys.readouterr().err
