"""Workflow wiring of extraction (scatter/gather DAG), the real detector through extract_shard, and an
end-to-end import run."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, run_snakemake

from itmatch.features.regions_io import DTYPES, open_regions


def _jobs(stdout: str) -> dict[str, int]:
    """Job counts from a dry run's table ('rule   count')."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", stdout, re.M)}


def test_dry_run_scatters_extraction(tmp_path):
    ckpt = tmp_path / "ckpt" / "model.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    cfg = tmp_path / "over.yaml"
    cfg.write_text(yaml.safe_dump({"detector": {"checkpoints": {"shapes": str(ckpt)}}}))
    proc = run_snakemake(tmp_path, "results/features/shapes/regions.parquet", "-n", "--configfile",
                         str(REPO / "config" / "config.yaml"), str(REPO / ".test" / "config" / "config.yaml"),
                         str(cfg), "--set-scatter", "extract=3")
    jobs = _jobs(proc.stdout)
    assert jobs.get("extract_regions_shard") == 3 and jobs.get("gather_regions") == 1, proc.stdout[-3000:]
    assert "results/features/shapes/shards/3-of-3.h5" in proc.stdout
    proc = run_snakemake(tmp_path, "results/features/shapes/regions.parquet", "-n", "--configfile",
                         str(REPO / "config" / "config.yaml"), str(REPO / ".test" / "config" / "config.yaml"),
                         str(cfg))
    assert _jobs(proc.stdout).get("extract_regions_shard") == 2  # extraction.shards of the test config


def test_real_detector_extracts_contract(tmp_path, tiny_shapes):
    """The pure-PyTorch detector (random weights, small config) through extract_shard + gather."""
    det = pytest.importorskip("itmatch.features.detector")
    from itmatch.config import load_config
    from itmatch.data.ingest import IngestOptions, ingest
    from itmatch.features import extract as ex
    from itmatch.features.detector.checkpoint import save_own
    from itmatch.features.detector.model import build_model

    ingest(tiny_shapes / "dataset_shapes.json", tiny_shapes / "images", tmp_path / "images.parquet",
           tmp_path / "captions.parquet", IngestOptions())
    t = pd.read_parquet(tmp_path / "images.parquet").head(6)
    t.to_parquet(tmp_path / "images6.parquet")
    cfg = det.detector_config(load_config(REPO / "config" / "config.yaml")["detector"], "shapes")
    cfg["inference"].update(min_size=64, max_size=64, pre_nms=60, post_nms=12, batch_size=4)
    arch = {**cfg["architecture"], "num_object_classes": 7, "num_attribute_classes": 9}
    save_own(tmp_path / "model.pt", build_model(arch), cfg["input"], [f"o{i}" for i in range(6)],
             [f"a{i}" for i in range(8)])
    opts = ex.ExtractOptions.from_config({"workers": 0}, cfg)
    assert (opts.batch_size, opts.max_regions) == (4, 36)
    shard = ex.extract_shard(tmp_path / "images6.parquet", tiny_shapes / "images", tmp_path / "1-of-1.h5", 0, 1,
                             tmp_path / "model.pt", cfg, opts)
    ex.gather_shards([shard], tmp_path / "images6.parquet", tmp_path / "regions.h5", tmp_path / "regions.parquet")
    with open_regions(tmp_path / "regions.h5") as reg:
        assert reg.r == 36 and reg.n == 6 and reg.d == reg.meta.feature_dim
        assert all(reg[k].dtype == v for k, v in DTYPES.items())
        nr = reg["num_regions"][:]
        assert (nr > 0).all() and (nr <= 12).all()
        hw = reg["image_hw"][:]
        b = reg["boxes"][:]
        for i in range(6):
            assert (b[i, :nr[i], 2] <= hw[i, 1] + 1e-3).all() and (b[i, :nr[i], 3] <= hw[i, 0] + 1e-3).all()
        assert "bottom-up" in reg.meta.detector and len(reg.meta.object_names) == 6
    regs = pd.read_parquet(tmp_path / "regions.parquet")
    assert len(regs) == nr.sum() and set(regs.object) <= {f"o{i}" for i in range(6)}


@pytest.mark.slow
def test_workflow_imports_tsv(tmp_path):
    """End to end: shapes → images.parquet, a TSV written for it, rule import_regions → regions.h5/parquet."""
    run_snakemake(tmp_path, "results/data/shapes/images.parquet")
    t = pd.read_parquet(tmp_path / "results/data/shapes/images.parquet")
    rng = np.random.default_rng(0)
    lines = []
    for iid, w, h in zip(t.image_id, t.width, t.height, strict=True):
        n = int(rng.integers(1, 5))
        boxes = np.tile(np.array([1, 2, 30, 40], np.float32), (n, 1))
        feats = rng.standard_normal((n, 8)).astype(np.float32)
        lines.append("\t".join([str(iid), str(w), str(h), str(n), base64.b64encode(boxes.tobytes()).decode(),
                                base64.b64encode(feats.tobytes()).decode()]))
    tsv = tmp_path / "feats.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    over = tmp_path / "over.yaml"
    over.write_text(yaml.safe_dump({"extraction": {"import": {"shapes": {"format": "tsv", "files": [str(tsv)],
                                                                        "max_regions": 4}}}}))
    run_snakemake(tmp_path, "results/features/shapes/regions.parquet", "--configfile",
                  str(REPO / "config" / "config.yaml"), str(REPO / ".test" / "config" / "config.yaml"), str(over))
    with open_regions(tmp_path / "results/features/shapes/regions.h5") as reg:
        assert reg.n == len(t) and reg.r == 4 and reg.d == 8 and reg.has_boxes
    assert Path(tmp_path / "logs/import_regions/shapes.log").exists()
