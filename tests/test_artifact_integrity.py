"""Corrupted artifacts fail loudly and by name: a truncated HDF5 file and a same-size byte flip inside a chunk
give our message naming the file and how to rebuild it; NaN/inf never reach a written feature file; a
diverged training writes no model; evaluation writes no metrics from a non-finite similarity matrix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from itmatch.corpus.data import Corpus, DataPaths, RowDataset, collate_images, loader
from itmatch.corpus.synthetic import write_synthetic_corpus
from itmatch.evaluation.evaluate import NonFiniteSimilarityError, evaluate_checkpoint, run_evaluation
from itmatch.features.blocks import write_blocks
from itmatch.features.regions_io import (
    RegionsMeta,
    create_regions,
    open_regions,
    pad_regions,
    write_regions_parquet,
    write_rows,
)
from itmatch.training.loop import TrainingDiverged, train_model
from itmatch.utils.h5 import ArtifactReadError, NonFiniteError

MODEL_CFG = {"embed_dim": 16, "word_dim": 8, "block_dim": 4, "direction": "t2i"}
TRAIN_CFG = {"num_workers": 0, "device": "cpu", "precision": "fp32",
             "epochs": 1, "batch_size": 8, "lr": 2e-3, "val_max_images": 8, "checkpoint_every_steps": 0,
             "threads": 1, "seed": 5}


@pytest.fixture(scope="module")
def corpus_paths(tmp_path_factory) -> DataPaths:
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), n_train=16, n_val=8, n_test=8, R=5, D=16)


def _copy(paths: DataPaths, dst: Path) -> DataPaths:
    shutil.copytree(Path(paths.regions).parent, dst)
    return DataPaths(**{k: (str(dst / Path(v).name) if v else v) for k, v in paths.__dict__.items()})


def _flip_byte_in_chunk(path: str, dataset: str, chunk: int) -> None:
    """Flip one byte in the middle of a stored chunk: the file keeps its size and its metadata."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
        assert f[dataset].fletcher32, f"{path}:{dataset} was written without a checksum"
    offset = info.byte_offset + info.size // 2
    size = Path(path).stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x5A]))
    assert Path(path).stat().st_size == size


def _assert_named(err: pytest.ExceptionInfo, path: str) -> None:
    msg = str(err.value)
    assert path in msg and f"snakemake --force {path}" in msg, msg


def test_every_written_dataset_is_checksummed(corpus_paths, tmp_path):
    meta = RegionsMeta("test", "0" * 64, 4)
    with create_regions(tmp_path / "r.h5", 3, 2, meta, image_ids=np.arange(3), early_alloc=True) as f:
        names = list(f)
        assert all(f[n].fletcher32 for n in names), [n for n in names if not f[n].fletcher32]

        def chunks():
            return {n: [(c.byte_offset, c.size) for c in map(f[n].id.get_chunk_info, range(f[n].id.get_num_chunks()))]
                    for n in names}

        # resumable shards: with the checksum, writes still land in the chunks allocated up front (no chunk moves)
        before = chunks()
        write_rows(f, 0, [pad_regions({"features": np.ones((2, 4)), "object_conf": np.ones(2)}, 2, (3, 3))] * 3)
        f.flush()
        assert chunks() == before
    write_blocks(tmp_path / "b.h5", np.arange(3), np.zeros((3, 2, 2), np.int16), np.zeros((3, 2, 2)), 4, 2)
    with h5py.File(tmp_path / "b.h5") as f:
        assert all(f[n].fletcher32 for n in f)


def test_truncated_regions_file_names_file_and_rebuild(corpus_paths, tmp_path):
    paths = _copy(corpus_paths, tmp_path / "c")
    size = Path(paths.regions).stat().st_size
    with open(paths.regions, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(ArtifactReadError) as err:
        Corpus(paths, frozenset({"blocks"}))
    _assert_named(err, paths.regions)
    with pytest.raises(ArtifactReadError) as err:
        open_regions(paths.regions)
    _assert_named(err, paths.regions)


def test_byte_flip_in_a_feature_chunk_is_detected(corpus_paths, tmp_path):
    paths = _copy(corpus_paths, tmp_path / "c")
    _flip_byte_in_chunk(paths.regions, "features", 3)
    corpus = Corpus(paths, frozenset({"blocks"}))  # metadata intact: opens
    corpus.image_item(2)  # other chunks read fine
    with pytest.raises(ArtifactReadError) as err:
        corpus.image_item(3)
    _assert_named(err, paths.regions)
    assert "image row 3" in str(err.value)
    # the same through a DataLoader worker process (training / evaluation read there)
    with pytest.raises(ArtifactReadError, match=r"snakemake --force .*regions\.h5"):
        list(loader(RowDataset(corpus, np.arange(6), "images"), batch_size=4, num_workers=1,
                    collate=collate_images))


def test_byte_flip_in_a_blocks_chunk_is_detected(corpus_paths, tmp_path):
    paths = _copy(corpus_paths, tmp_path / "c")
    _flip_byte_in_chunk(paths.blocks, "weight", 1)
    corpus = Corpus(paths, frozenset({"blocks"}))
    with pytest.raises(ArtifactReadError) as err:
        corpus.image_item(1)
    _assert_named(err, paths.blocks)


def test_byte_flip_in_regions_h5_stops_the_parquet_writer(tmp_path):
    meta = RegionsMeta("test", "0" * 64, 8)
    path = tmp_path / "regions.h5"
    rng = np.random.default_rng(0)
    with create_regions(path, 4, 3, meta, image_ids=np.arange(10, 14)) as f:
        write_rows(f, 0, [pad_regions({"features": rng.standard_normal((2, 8)), "boxes": np.ones((2, 4)),
                                       "object_conf": np.ones(2)}, 3, (10, 10)) for _ in range(4)])
    _flip_byte_in_chunk(str(path), "object_conf", 0)
    with pytest.raises(ArtifactReadError) as err:
        write_regions_parquet(path, tmp_path / "regions.parquet")
    _assert_named(err, str(path))
    assert not (tmp_path / "regions.parquet").exists()


def test_non_finite_region_features_are_never_written(tmp_path):
    meta = RegionsMeta("test", "0" * 64, 4)
    feats = np.ones((2, 4), np.float32)
    feats[1, 2] = np.nan
    with pytest.raises(NonFiniteError, match=r"images\.parquet row 7: region 1 has non-finite features"):
        pad_regions({"features": feats}, 3, (10, 10), what="images.parquet row 7")
    big = np.full((1, 4), 1e6, np.float32)  # finite in float32, inf once stored as float16
    with pytest.raises(NonFiniteError, match="float16"):
        pad_regions({"features": big}, 3, (10, 10), what="x.tsv:3")
    path = tmp_path / "regions.h5"
    with create_regions(path, 3, 3, meta, image_ids=np.array([5, 6, 7])) as f:
        good = pad_regions({"features": np.ones((2, 4))}, 3, (10, 10))
        bad = dict(good, object_conf=np.array([0.5, np.inf, 0], np.float16))
        with pytest.raises(NonFiniteError, match=r"regions\.h5: dataset 'object_conf' row 2 \(image_id 7\)"):
            write_rows(f, 1, [good, bad])
        assert (f["object_conf"][1:3] == 0).all()  # nothing of the refused write landed


def test_non_finite_block_weights_are_never_written(tmp_path):
    w = np.zeros((3, 2, 2), np.float32)
    w[2, 1, 0] = np.nan
    with pytest.raises(NonFiniteError, match=r"blocks\.h5: dataset 'weight' row 2 \(image_id 12\)"):
        write_blocks(tmp_path / "blocks.h5", np.array([10, 11, 12]), np.zeros((3, 2, 2), np.int16), w, 4, 2)
    assert not (tmp_path / "blocks.h5").exists()


def test_nan_features_stop_training_and_evaluation(corpus_paths, tmp_path):
    """Same-size NaN corruption of the inputs (valid checksums: written after the fact by a buggy tool)."""
    paths = _copy(corpus_paths, tmp_path / "c")
    with h5py.File(paths.regions, "r+") as f:
        f["features"][0:16] = np.nan  # every training image
    out = tmp_path / "o"
    out.mkdir()
    corpus = Corpus(paths, frozenset({"blocks"}))
    with pytest.raises(TrainingDiverged, match=r"pfan: training diverged: non-finite loss \(nan\) at epoch 0, "
                                               r"step 1"):
        train_model("pfan", MODEL_CFG, TRAIN_CFG, corpus, out / "model.pt", out / "log.csv", out / ".state.pt")
    assert not (out / "model.pt").exists() and not (out / "log.csv").exists()


def test_diverging_lr_stops_training_without_a_model(corpus_paths, tmp_path):
    corpus = Corpus(corpus_paths, frozenset({"blocks"}))
    cfg = {**TRAIN_CFG, "lr": 1e30, "optimizer": "sgd", "grad_clip": 0}
    with pytest.raises(TrainingDiverged, match=r"non-finite (loss|gradient norm).*no model is written.*training\.lr"):
        train_model("pfan", MODEL_CFG, cfg, corpus, tmp_path / "model.pt", tmp_path / "log.csv",
                    tmp_path / ".state.pt")
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "log.csv").exists()


def test_patience_skips_non_finite_steps_then_stops(corpus_paths, tmp_path, monkeypatch):
    """With nonfinite_patience 2, two NaN steps in a row are skipped (weights untouched), the third stops."""
    from itmatch.models.pfan import PFAN

    orig = PFAN.loss
    calls = {"n": 0}

    def flaky(self, *a, **k):
        loss, extra = orig(self, *a, **k)
        calls["n"] += 1
        return (loss * float("nan"), extra) if calls["n"] in (1, 2, 4, 5, 6) else (loss, extra)

    monkeypatch.setattr(PFAN, "loss", flaky)
    corpus = Corpus(corpus_paths, frozenset({"blocks"}))
    with pytest.raises(TrainingDiverged, match=r"step 6, 3 consecutive non-finite step\(s\)"):
        train_model("pfan", MODEL_CFG, {**TRAIN_CFG, "nonfinite_patience": 2}, corpus, tmp_path / "model.pt",
                    tmp_path / "log.csv", tmp_path / ".state.pt")
    assert calls["n"] == 6 and not (tmp_path / "model.pt").exists()


def test_evaluation_refuses_a_non_finite_similarity(corpus_paths, tmp_path):
    corpus = Corpus(corpus_paths, frozenset({"blocks"}))
    best = train_model("pfan", MODEL_CFG, TRAIN_CFG, corpus, tmp_path / "model.pt", tmp_path / "log.csv",
                       tmp_path / ".state.pt")
    assert np.isfinite(best["val_rsum"])
    ck = torch.load(tmp_path / "model.pt", weights_only=True)
    first = next(k for k, v in ck["parts"][0]["state_dict"].items() if v.is_floating_point())
    ck["parts"][0]["state_dict"][first].fill_(float("nan"))
    torch.save(ck, tmp_path / "nan.pt")
    assert evaluate_checkpoint(str(tmp_path / "model.pt"), corpus)[0]["1k"]["rsum"] > 0
    with pytest.raises(NonFiniteSimilarityError, match=r"nan\.pt part 1/1 on the test split: the similarity matrix"):
        run_evaluation("pfan", str(tmp_path / "nan.pt"), corpus, str(tmp_path / "metrics.json"), {}, {}, "x")
    assert not (tmp_path / "metrics.json").exists()
    json.dumps(best["config"])  # the checkpoint holds plain values only
