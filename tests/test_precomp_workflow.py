"""The precomp dataset kind through the workflow (docs/precomp.md): refusals before any job, and (slow) SCAN and
PFAN trained and evaluated end to end on a folder made from the committed real captions with seeded 36 × 2048
features and PFAN position files, then a released-layout SCAN checkpoint imported and evaluated."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, run_snakemake

from itmatch.cli import main
from itmatch.models.checkpoint import load_parts
from itmatch.models.registry import build_model
from tests.precomp_folder import VOCAB, make_precomp_folder

CONFIGS = (str(REPO / "config" / "config.yaml"), str(REPO / ".test" / "config" / "config.yaml"))


def _override(path: Path, name: str, block: dict) -> Path:
    """The dataset and the tiny sizes the test config gives shapes."""
    path.write_text(yaml.safe_dump({
        "datasets": {name: block},
        "models": {"scan": {"datasets": {name: {"embed_dim": 32, "word_dim": 32}}},
                   "pfan": {"datasets": {name: {"embed_dim": 32, "word_dim": 32, "block_dim": 16}}}},
        "training": {"datasets": {name: {"epochs": 1, "batch_size": 32, "num_workers": 0, "val_max_images": 20,
                                         "checkpoint_every_steps": 5}}},
    }))
    return path


def _refused(work: Path, target: str, over: Path) -> str:
    proc = run_snakemake(work, target, "--configfile", *CONFIGS, str(over), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert not (work / "results").exists(), "a job ran"
    return out


def test_refusals_before_any_job(tmp_path):
    folder = make_precomp_folder(tmp_path / "f30k_precomp", dim=8, boxes=False)
    over = _override(tmp_path / "o.yaml", "f30kp", {"kind": "precomp", "folder": str(folder)})
    out = _refused(tmp_path / "w1", "results/bssan/f30kp/metrics.json", over)
    # BSSAN's default W2R input is the VGG-19 grid: refused for its unset weights first, or for the precomp
    # folder's missing grid / object confidences
    assert ("model 'bssan' cannot be trained or evaluated on dataset 'f30kp' (kind precomp, " in out
            or "grid.weights" in out), out[-3000:]
    out = _refused(tmp_path / "w2", "results/pfan/f30kp/metrics.json", over)
    assert ("model 'pfan' cannot be trained or evaluated on dataset 'f30kp'" in out
            and "it needs PFAN's position files (train_boxes.npy, dev_boxes.npy, test_boxes.npy in the folder; "
                "datasets.f30kp.boxes) for blocks.h5" in out), out[-3000:]
    over = _override(tmp_path / "o2.yaml", "f30kp", {"kind": "precomp", "folder": str(folder),
                                                      "splits": {"test": "testall"}})
    out = _refused(tmp_path / "w3", "results/scan/f30kp/metrics.json", over)
    assert f"datasets.f30kp.splits.test: {folder}/testall_caps.txt does not exist" in out, out[-3000:]


def _released_scan(path: Path, vocab_size: int) -> Path:
    """A seeded SCAN t2i model of the dataset's shapes (2048-d features, SCAN's vocabulary), saved in the released
    layout (kuanghuei/SCAN train.py lines 145–151) with our state renamed to theirs."""
    torch.manual_seed(5)
    m = build_model("scan", {"embed_dim": 16, "word_dim": 8, "direction": "t2i"},
                    {"vocab_size": vocab_size, "feature_dim": 2048})
    sd = m.state_dict()
    opt = argparse.Namespace(embed_size=16, word_dim=8, num_layers=1, img_dim=2048, vocab_size=vocab_size,
                             cross_attn="t2i", agg_func="LogSumExp", lambda_softmax=9.0, lambda_lse=6.0,
                             raw_feature_norm="clipped_l2norm", precomp_enc_type="basic", bi_gru=True,
                             no_imgnorm=False, no_txtnorm=False, data_name="f30k_precomp")
    model = [{k[len("img_enc."):]: v for k, v in sd.items() if k.startswith("img_enc.")},
             {k[len("txt_enc."):]: v for k, v in sd.items() if k.startswith("txt_enc.")}]
    torch.save({"epoch": 1, "model": model, "best_rsum": 0.0, "opt": opt, "Eiters": 1}, path)
    return path


@pytest.mark.slow
def test_precomp_trains_scan_and_pfan_and_evaluates_a_released_model(tmp_path):
    folder = make_precomp_folder(tmp_path / "f30k_precomp", signal=0.5)  # 140 / 30 / 30 images, 36 × 2048
    over = _override(tmp_path / "o.yaml", "f30kp", {"kind": "precomp", "folder": str(folder), "vocab": str(VOCAB)})
    work = tmp_path / "work"
    targets = ["results/scan/f30kp/metrics.json", "results/pfan/f30kp/metrics.json"]
    run_snakemake(work, *targets, "--configfile", *CONFIGS, str(over))
    images = pd.read_parquet(work / "results/data/f30kp/images.parquet")
    assert images["split"].value_counts().to_dict() == {"train": 140, "val": 30, "test": 30}
    vocab = json.loads((work / "results/text/f30kp/vocab.json").read_text())
    assert vocab["idx2word"] == [w for w, _ in sorted(json.loads(VOCAB.read_text())["word2idx"].items(),
                                                       key=lambda kv: kv[1])]
    for target, model in zip(targets, ("scan", "pfan"), strict=True):
        metrics = json.loads((work / target).read_text())
        assert metrics["model"] == model and metrics["dataset"] == "f30kp"
        assert metrics["n_images"] == 30 and metrics["n_captions"] == 150
        one = metrics["protocols"]["1k"]
        assert one["folds"] == 1 and 0 <= one["rsum"] <= 600 and set(one) >= {"i2t", "t2i", "rsum"}
    # PFAN read the position files: blocks.h5 came from them (rule import_pfan_blocks), not from boxes
    assert (work / "logs/import_pfan_blocks/f30kp.log").exists()
    # a released SCAN checkpoint for this data: import, then evaluate through the workflow
    released = _released_scan(tmp_path / "model_best.pth.tar", len(vocab["idx2word"]))
    run_dir = work / "results/imported/scan_rel"
    assert main(["import-checkpoint", "scan", str(released), "--dataset", "f30kp", "--out", str(run_dir),
                 "--vocab", str(work / "results/text/f30kp/vocab.json")]) == 0
    run_snakemake(work, "results/imported/scan_rel/metrics.json", "--configfile", *CONFIGS, str(over))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "scan" and metrics["dataset"] == "f30kp" and metrics["n_images"] == 30
    assert metrics["config"]["imported"] == {"model": "scan", "dataset": "f30kp"}
    name, parts = load_parts(run_dir / "model.pt")
    assert name == "scan" and len(parts) == 1
