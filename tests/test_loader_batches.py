"""The batched training-data path: whole batches read at once (raw chunks, vectorised fletcher32 checks), built
in reused shared-memory slots by workers; equal, tensor by tensor, to batches assembled from h5py reads."""

from __future__ import annotations

import gc
from functools import partial

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from itmatch.corpus.data import (
    PREFETCH_FACTOR,
    BatchArena,
    Corpus,
    ImageRows,
    PairDataset,
    RowDataset,
    collate_images,
    collate_pairs,
    epoch_batches,
    loader,
)
from itmatch.corpus.synthetic import write_synthetic_corpus
from itmatch.utils.h5 import ArtifactReadError, ChunkRows, chunk_table, fletcher32, fletcher32_matches
from tests.test_artifact_integrity import _copy, _flip_byte_in_chunk
from tests.test_smfea_glfn_train import _extend

REQUIRES = frozenset({"blocks", "tags", "bert", "trees"})


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("c")
    return _extend(write_synthetic_corpus(root, n_train=24, n_val=4, n_test=4, R=5, D=8), root)


def reference_pairs(paths, caption_rows: list[int], float16: bool) -> tuple[dict, dict]:
    """A batch assembled independently of itmatch.corpus.data: every array read with h5py / pyarrow."""
    caps = pq.read_table(paths.captions).to_pandas()
    imgs = pq.read_table(paths.images).column("image_id").to_numpy()
    row_of = {int(i): r for r, i in enumerate(imgs)}
    rows = np.array([row_of[int(caps["image_id"][c])] for c in caption_rows])
    with h5py.File(paths.regions) as f:
        feats = np.stack([f["features"][r] for r in rows])
        images = {"features": torch.from_numpy(feats if float16 else feats.astype(np.float32)),
                  "index": torch.from_numpy(rows.astype(np.int64))}
        for key, dtype in (("num_regions", np.int64), ("boxes", np.float32), ("image_hw", np.int64),
                           ("object_id", np.int64), ("attribute_id", np.int64), ("object_conf", np.float32)):
            images[key] = torch.from_numpy(f[key][:][rows].astype(dtype))
    with h5py.File(paths.blocks) as f:
        images["block_index"] = torch.from_numpy(np.stack([f["index"][r] for r in rows]).astype(np.int64))
        images["block_weight"] = torch.from_numpy(np.stack([f["weight"][r] for r in rows]).astype(np.float32))
    with h5py.File(paths.tags) as f:
        idx = f["index"][:][rows]
        vec = f["vectors"][:].astype(np.float32)[np.clip(idx, 0, None)]
        vec[idx < 0] = 0
        images["tag_vectors"] = torch.from_numpy(vec)
    toks = pq.read_table(paths.tokens).column("tokens").to_pylist()
    trees = pq.read_table(paths.trees).column("labels").to_pylist()
    lengths = [len(toks[c]) for c in caption_rows]
    W = max(lengths)
    tokens = np.zeros((len(caption_rows), W), np.int64)
    with h5py.File(paths.bert) as f:
        H = f["values"].shape[1]
        bert = np.zeros((len(caption_rows), W, H), np.float32)
        for i, c in enumerate(caption_rows):
            tokens[i, : lengths[i]] = toks[c]
            s, e = f["offsets"][c], f["offsets"][c + 1]
            bert[i, : e - s] = f["values"][s:e]
    captions = {"tokens": torch.from_numpy(tokens), "lengths": torch.tensor(lengths),
                "image_index": torch.from_numpy(rows.astype(np.int64)), "index": torch.tensor(caption_rows),
                "bert": torch.from_numpy(bert), "tree_labels": torch.tensor([trees[c] for c in caption_rows])}
    return images, captions


def assert_same(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert list(g) == list(w) or set(g) == set(w), (sorted(g), sorted(w))
        for k in w:
            assert g[k].dtype == w[k].dtype and g[k].shape == w[k].shape, (k, g[k].dtype, w[k].dtype)
            assert torch.equal(g[k], w[k]), k


@pytest.mark.parametrize("float16", [True, False])
def test_batches_equal_h5py_reads_in_process_and_in_workers(paths, float16):
    corpus = Corpus(paths, REQUIRES)
    ds = PairDataset(corpus, corpus.rows("train", "captions"))
    batches = epoch_batches(len(ds), 16, seed=3, epoch=1)  # random captions: images repeat within a batch
    want = [reference_pairs(paths, [int(ds.rows[k]) for k in b], float16) for b in batches]
    collate = partial(collate_pairs, float16=float16)
    assert isinstance(ds.__getitems__(batches[0]).images, ImageRows)
    for b, w in zip(batches, want, strict=True):
        assert_same(collate(ds.__getitems__(b)), w)  # the batched read
        assert_same(collate([ds[k] for k in b]), w)  # items one by one (same values)
    for workers in (0, 1, 2):
        got = list(loader(ds, batches, num_workers=workers, collate=collate, persistent=workers > 0))
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)


def test_evaluation_image_batches_equal_items(paths):
    corpus = Corpus(paths, REQUIRES)
    rows = corpus.rows("test", "images")
    for workers in (0, 1):
        got = list(loader(RowDataset(corpus, rows, "images"), batch_size=3, num_workers=workers,
                          collate=collate_images))
        want = [collate_images([corpus.image_item(int(r)) for r in rows[s:s + 3]]) for s in range(0, len(rows), 3)]
        for g, w in zip(got, want, strict=True):
            assert_same((g,), (w,))


def test_worker_batches_reuse_arena_slots_and_kept_batches_stay_intact(paths, monkeypatch):
    import itmatch.corpus.data as data_module

    monkeypatch.setattr(data_module, "SMALL_BYTES", 0)  # these tiny batches: every tensor stays in its slot
    corpus = Corpus(paths, REQUIRES)
    ds = PairDataset(corpus, corpus.rows("train", "captions"))
    batches = epoch_batches(len(ds), 4, seed=0, epoch=0)  # 30 batches
    want = [collate_pairs(ds.__getitems__(b)) for b in batches]
    ld = loader(ds, batches, num_workers=2, collate=collate_pairs, persistent=True)
    # Consumed one at a time: every batch is built in the arena, in a handful of reused slots.
    addresses = set()
    for i, (images, captions) in enumerate(ld):
        assert_same((images, captions), want[i])
        addresses.add(images["features"].data_ptr())
        del images, captions
    arena = ld._arena
    assert isinstance(arena, BatchArena) and arena.slots == PREFETCH_FACTOR + 2
    base = arena.address(0)
    assert all(base <= a < base + arena.workers * arena.slots * arena.slot_bytes for a in addresses)
    assert len(addresses) <= arena.workers * arena.slots < len(batches)
    # Kept batches (more than the slots): the others are built in fresh shared memory, none is overwritten.
    kept = list(ld)
    for g, w in zip(kept, want, strict=True):
        assert_same(g, w)
    del kept, g
    gc.collect()
    # Every slot is free again once no tensor of its batch is held.
    taken = [arena.take(w) for w in range(arena.workers) for _ in range(arena.slots)]
    assert None not in taken and arena.take(0) is None
    for s in taken:
        arena.release(s)
    # Small tensors are copied out of the slot: keeping them (a model's encoding keeps num_regions) holds none.
    monkeypatch.setattr(data_module, "SMALL_BYTES", 1 << 20)
    kept = [(images["num_regions"], captions["lengths"]) for images, captions in ld]
    assert len(kept) == len(batches)
    gc.collect()
    taken = [arena.take(w) for w in range(arena.workers) for _ in range(arena.slots)]
    assert None not in taken
    for s in taken:
        arena.release(s)


@pytest.mark.parametrize("nbytes", [1, 2, 3, 31, 32, 33, 64, 511, 4096, 4098, 147456])
def test_fletcher32_equals_hdf5(tmp_path, nbytes):
    rng = np.random.default_rng(nbytes)
    rows = np.concatenate([rng.integers(0, 256, (4, nbytes), dtype=np.uint8), np.zeros((1, nbytes), np.uint8),
                           np.full((1, nbytes), 255, np.uint8), np.eye(1, nbytes, nbytes - 1, dtype=np.uint8)])
    with h5py.File(tmp_path / "f.h5", "w") as f:
        ds = f.create_dataset("x", data=rows, chunks=(1, nbytes), fletcher32=True)
        stored = np.array([int.from_bytes(ds.id.read_direct_chunk((i, 0))[1][-4:], "little")
                           for i in range(len(rows))], np.uint32)
    assert np.array_equal(fletcher32(rows), stored)
    swapped = ((stored & 0x00FF00FF) << 8) | ((stored >> 8) & 0x00FF00FF)  # the HDF5 ≤ 1.6.2 form HDF5 accepts
    assert fletcher32_matches(rows, swapped).all()
    assert not fletcher32_matches(rows, stored ^ 1).any()
    with pytest.raises(ValueError, match="uint8"):
        fletcher32(rows.astype(np.int16))


def test_chunk_rows_reads_verify_and_fall_back(paths, tmp_path):
    p = _copy(paths, tmp_path / "c")
    with h5py.File(p.regions, "r+") as f:
        want = f["features"][:]
        # another layout: several images per chunk (e.g. a file written by other tools) reads row by row
        f.create_dataset("features_blocked", data=want, chunks=(4, *want.shape[1:]), fletcher32=True)
        f.create_dataset("features_plain", data=want, chunks=(1, *want.shape[1:]))  # no checksum at all
        f.create_dataset("features_sparse", shape=want.shape, dtype=want.dtype, chunks=(1, *want.shape[1:]),
                         fletcher32=True)
        f["features_sparse"][3] = want[3]  # other chunks never written: HDF5's fill value
    rows = np.array([5, 0, 3, 3, 7, 1])
    with h5py.File(p.regions) as f:
        for direct_io in (False, True):  # buffered reads, and O_DIRECT (aligned reads into a staging buffer)
            for name, raw in (("features", True), ("features_blocked", False), ("features_plain", True)):
                reader = ChunkRows(f[name], p.regions, "image row", direct_io=direct_io)
                assert reader.raw == raw, name
                for dtype in (np.float16, np.float32):  # read in place, and read then cast
                    out = np.empty((len(rows), *want.shape[1:]), dtype)
                    reader.read_into(rows, out)
                    assert np.array_equal(out, want[rows].astype(dtype)), (name, direct_io, dtype)
            out = np.empty((len(rows), *want.shape[1:]), np.float16)
            ChunkRows(f["features_sparse"], p.regions, direct_io=direct_io).read_into(rows, out)
            assert np.array_equal(out[2], want[3]) and not out[[0, 1, 4, 5]].any()
        table = chunk_table(f["features_sparse"])
        assert (table[3, 0] > 0 and table[3, 2] == 0) and (table[np.arange(len(table)) != 3] == -1).all()
    _flip_byte_in_chunk(p.regions, "features", 7)
    with h5py.File(p.regions) as f:
        for direct_io in (False, True):
            reader = ChunkRows(f["features"], p.regions, "image row", direct_io=direct_io)
            reader.read_into(np.array([6, 8]), np.empty((2, *want.shape[1:]), np.float16))  # others read fine
            with pytest.raises(ArtifactReadError, match=r"image row 7.*snakemake --force"):
                reader.read_into(rows, np.empty((len(rows), *want.shape[1:]), np.float16))


def test_regions_files_align_feature_chunks_for_direct_reads(tmp_path):
    """create_regions puts every feature chunk (≥ 64 KiB) at a 4 KiB file offset; O_DIRECT then reads each
    into a page-aligned batch directly (and a byte flip is still caught)."""
    import mmap

    from itmatch.features.regions_io import RegionsMeta, create_regions

    n, r, d = 6, 4, 2048  # 16 KiB of features per image: below the threshold; 36 regions are above it
    rng = np.random.default_rng(0)
    for regions, aligned in ((r, False), (36, True)):
        path = tmp_path / f"regions{regions}.h5"
        want = rng.standard_normal((n, regions, d)).astype(np.float16)
        with create_regions(path, n, regions, RegionsMeta("t", "0" * 64, d), image_ids=np.arange(n)) as f:
            f["features"][:] = want
        with h5py.File(path) as f:
            table = chunk_table(f["features"])
            assert ((table[:, 0] % 4096 == 0).all()) == aligned, table[:, 0] % 4096
            reader = ChunkRows(f["features"], path, "image row", direct_io=True)
            buf = np.frombuffer(mmap.mmap(-1, n * regions * d * 2), np.float16).reshape(n, regions, d)
            rows = np.array([4, 1, 1, 5])
            reader.read_into(rows, buf[: len(rows)])
            assert np.array_equal(buf[: len(rows)], want[rows])
    _flip_byte_in_chunk(str(path), "features", 1)
    with h5py.File(path) as f, pytest.raises(ArtifactReadError, match="image row 1"):
        ChunkRows(f["features"], path, "image row", direct_io=True).read_into(rows, buf[: len(rows)])
