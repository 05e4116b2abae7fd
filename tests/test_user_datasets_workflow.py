"""Datasets by declaration through the workflow: the documented image-folder one-liner (docs/data.md "Your own
data") extracts regions, a model target on an images-only dataset stops at once, and a captions-kind dataset
trains PFAN end to end (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, run_snakemake

from itmatch.data.shapes import ShapesSpec, make_image


def random_detector(path: Path) -> Path:
    """The demo detector architecture with random weights (as tests/test_extract_workflow.py): fast, real code."""
    from itmatch.config import load_config
    from itmatch.features.detector import detector_config
    from itmatch.features.detector.checkpoint import save_own
    from itmatch.features.detector.model import build_model

    cfg = detector_config(load_config(REPO / "config" / "config.yaml")["detector"])
    arch = {**cfg["architecture"], "num_object_classes": 7, "num_attribute_classes": 9}
    save_own(path, build_model(arch), cfg["input"], [f"o{i}" for i in range(6)], [f"a{i}" for i in range(8)])
    return path


def one_liner(name: str, images: Path) -> list[str]:
    """docs/data.md's one-liner, as arguments: `snakemake --cores 8 results/features/NAME/regions.h5 --config
    'datasets={NAME: {kind: images, images: PATH}}'`."""
    datasets = f"datasets={{{name}: {{kind: images, images: {images}}}}}"
    return [f"results/features/{name}/regions.h5", "--config", datasets]


def png_folder(folder: Path, n: int = 5) -> Path:
    """``n`` shapes scenes as PNG files."""
    folder.mkdir()
    spec = ShapesSpec(seed=11, image_size=96)
    for i in range(n):
        make_image(spec, i)[0].save(folder / f"scene{i}.png")
    return folder


def test_model_target_on_an_images_dataset_stops_at_once(tmp_path):
    """results/pfan/NAME/metrics.json on an images-only dataset: an error naming model, dataset and the missing
    captions while the DAG is built, before any job runs (the text stages' inputs check the same)."""
    pics = png_folder(tmp_path / "pics")
    proc = run_snakemake(tmp_path / "work", "results/pfan/pics/metrics.json", *one_liner("pics", pics)[1:],
                         check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert ("model 'pfan' cannot be trained or evaluated on dataset 'pics': it has no captions (datasets.pics.kind "
            "is 'images': an image folder only)") in out, out[-3000:]
    assert not (tmp_path / "work" / "results").exists() and not (tmp_path / "work" / "resources").exists()


@pytest.mark.slow
def test_image_folder_one_liner(tmp_path):
    """5 PNG images → regions.h5 with 36 regions each, through the one-liner (2 shards: the test config's)."""
    from itmatch.features.regions_io import open_regions

    pics = png_folder(tmp_path / "my photos")
    ckpt = random_detector(tmp_path / "detector.pt")
    work = tmp_path / "work"
    detector = f"detector={{checkpoints: {{pics: {ckpt}}}}}"  # the test's stand-in for the demo detector
    args = one_liner("pics", pics)
    run_snakemake(work, "--cores", "8", *args, detector)
    images = pd.read_parquet(work / "results/data/pics/images.parquet")
    assert images["file"].tolist() == [f"scene{i}.png" for i in range(5)]
    with open_regions(work / "results/features/pics/regions.h5") as reg:
        assert reg.n == 5 and reg.r == 36
        assert (reg["num_regions"][:] == 36).all()
        assert reg["image_id"][:].tolist() == images["image_id"].tolist()
        assert np.isfinite(reg["features"][:].astype(np.float32)).all()
        assert (reg["image_hw"][:] == 96).all()
    # sharded as extraction.shards says (2 in the test config), each shard its own resumable job
    assert sorted(p.name for p in (work / "logs/extract_regions").iterdir()) == ["pics.1-of-2.log", "pics.2-of-2.log"]


@pytest.mark.slow
def test_captions_dataset_trains_pfan(tmp_path):
    """~200 shapes scenes as an image folder + a CSV of file, caption (no split column: the seeded split)."""
    pics = tmp_path / "scenes"
    pics.mkdir()
    spec = ShapesSpec(seed=12, image_size=96)
    rows = []
    for i in range(200):
        img, _, sentences = make_image(spec, i)
        img.save(pics / f"s{i:03d}.jpg", quality=90)
        rows += [{"file": f"s{i:03d}.jpg", "caption": s["raw"]} for s in sentences]
    pd.DataFrame(rows).to_csv(tmp_path / "captions.csv", index=False)
    over = tmp_path / "mine.yaml"
    over.write_text(yaml.safe_dump({
        "datasets": {"mine": {"kind": "captions", "images": str(pics), "captions": str(tmp_path / "captions.csv")}},
        "detector": {"checkpoints": {"mine": str(random_detector(tmp_path / "detector.pt"))},
                     "per_dataset": {"mine": {"inference": {"min_size": 96, "max_size": 96, "pre_nms": 200,
                                                            "post_nms": 40, "batch_size": 8}}}},
        # the tiny sizes the test config gives shapes
        "models": {"pfan": {"datasets": {"mine": {"embed_dim": 32, "word_dim": 32, "block_dim": 16}}}},
        "training": {"datasets": {"mine": {"epochs": 2, "batch_size": 32, "num_workers": 0, "val_max_images": 20,
                                           "checkpoint_every_steps": 5}}},
    }))
    target = "results/pfan/mine/metrics.json"
    run_snakemake(tmp_path / "work", target, "--configfile", str(REPO / "config" / "config.yaml"),
                  str(REPO / ".test" / "config" / "config.yaml"), str(over))
    work = tmp_path / "work"
    images = pd.read_parquet(work / "results/data/mine/images.parquet")
    assert images["split"].value_counts().to_dict() == {"train": 160, "val": 20, "test": 20}
    metrics = json.loads((work / target).read_text())
    assert metrics["model"] == "pfan" and metrics["dataset"] == "mine"
    assert metrics["n_images"] == 20 and metrics["n_captions"] == 100
    one = metrics["protocols"]["1k"]
    assert one["folds"] == 1 and 0 <= one["rsum"] <= 600
    log = (work / "results/pfan/mine/train_log.csv").read_text().splitlines()
    assert log[0].startswith("part,epoch,step,loss") and len(log) == 1 + 2 * 2  # 2 parts × 2 epochs
