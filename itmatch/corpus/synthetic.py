"""A small learnable corpus in the artifact contract's formats (tests, memory benchmark).

Each image has a few "concepts" (word ids); its region features are the concepts' random prototype
vectors plus noise, its captions name its concepts. Writes images.parquet, captions.parquet,
tokens.parquet, vocab.json, regions.h5 (float16 features, one image per chunk) and blocks.h5.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from itmatch.corpus.data import DataPaths
from itmatch.features.blocks import compute_blocks, write_blocks


def write_synthetic_corpus(root: str | Path, n_train: int = 40, n_val: int = 10, n_test: int = 10, R: int = 6,
                           D: int = 32, n_words: int = 30, per: int = 5, seed: int = 0, K: int = 4, L: int = 3,
                           chunk: int = 4096) -> DataPaths:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    N = len(splits)
    image_ids = np.arange(1000, 1000 + N, dtype=np.int64)
    pq.write_table(pa.table({"image_id": image_ids, "split": splits, "file": [f"{i}.jpg" for i in image_ids],
                             "width": np.full(N, 100, np.int64), "height": np.full(N, 80, np.int64)}),
                   root / "images.parquet")
    vocab = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(n_words)]
    (root / "vocab.json").write_text(json.dumps({"idx2word": vocab}), encoding="utf-8")
    protos = rng.standard_normal((len(vocab), D)).astype(np.float32)
    cap_ids, cap_img, cap_split, toks = [], [], [], []
    with h5py.File(root / "regions.h5", "w") as f:
        f.create_dataset("image_id", data=image_ids, fletcher32=True)
        feats = f.create_dataset("features", (N, R, D), dtype="float16", chunks=(1, R, D), fletcher32=True)
        boxes = np.zeros((N, R, 4), np.float32)
        nreg = np.zeros(N, np.int16)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            block = np.zeros((e - s, R, D), np.float32)
            for k, n in enumerate(range(s, e)):
                concepts = rng.choice(np.arange(4, len(vocab)), size=3, replace=False)
                nr = int(rng.integers(max(1, R - 2), R + 1))
                nreg[n] = nr
                block[k, :nr] = protos[rng.choice(concepts, nr)] + 0.3 * rng.standard_normal((nr, D))
                xy = rng.uniform(0, 60, (nr, 2))
                boxes[n, :nr] = np.concatenate([xy, xy + rng.uniform(5, 40, (nr, 2))], 1)
                for j in range(per):
                    length = int(rng.integers(2, 6))
                    toks.append(rng.choice(concepts, length).astype(np.int32).tolist())
                    cap_ids.append(int(image_ids[n]) * 10 + j)
                    cap_img.append(int(image_ids[n]))
                    cap_split.append(splits[n])
            feats[s:e] = block.astype(np.float16)
        f.create_dataset("boxes", data=boxes)
        f.create_dataset("image_hw", data=np.tile(np.array([[80, 100]], np.int32), (N, 1)))
        f.create_dataset("num_regions", data=nreg)
        f.create_dataset("object_id", data=np.zeros((N, R), np.int16))
        f.create_dataset("attribute_id", data=np.zeros((N, R), np.int16))
        f.create_dataset("object_conf", data=np.ones((N, R), np.float16))
        f.attrs["feature_dim"] = D
    pq.write_table(pa.table({"caption_id": np.array(cap_ids, np.int64), "image_id": np.array(cap_img, np.int64),
                             "split": cap_split, "text": [" ".join(vocab[t] for t in c) for c in toks]}),
                   root / "captions.parquet")
    pq.write_table(pa.table({"caption_id": pa.array(cap_ids, pa.int64()),
                             "tokens": pa.array(toks, pa.list_(pa.int32()))}), root / "tokens.parquet")
    index, weight, _ = compute_blocks(boxes, np.tile([[80, 100]], (N, 1)), K, L, nreg)
    write_blocks(root / "blocks.h5", image_ids, index, weight, K, L)
    return DataPaths(images=str(root / "images.parquet"), captions=str(root / "captions.parquet"),
                     tokens=str(root / "tokens.parquet"), vocab=str(root / "vocab.json"),
                     regions=str(root / "regions.h5"), blocks=str(root / "blocks.h5"))


def synthetic_batches(n_img: int, n_cap: int, R: int = 36, D: int = 2048, vocab: int = 10_000, min_len: int = 8,
                      max_len: int = 16, bert_dim: int = 768, K: int = 16, L: int = 15, seed: int = 0,
                      grid_cells: int = 196, grid_dim: int = 512, n_concepts: int = 300
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, int]]:
    """Random image and caption batches with every key any model reads (features, num_regions, boxes,
    object_conf, block index/weight, tag vectors, VGG-19 grid; tokens, lengths, BERT vectors, tree labels, concept
    labels) and the matching ``data_info``. Caption ``k`` belongs to image ``k % n_img``. Defaults: COCO-size
    inputs (36 × 2048 regions, captions of 8–16 words, BERT-base width, the 16 × 16 block grid with 15 blocks per
    region, BSSAN's 14 × 14 × 512 conv5_4 grid, CVSE's 300 concepts)."""
    g = torch.Generator().manual_seed(seed)
    num = torch.randint(max(1, R - 6), R + 1, (n_img,), generator=g)
    valid = torch.arange(R)[None] < num[:, None]
    xy = torch.rand(n_img, R, 2, generator=g) * 400
    images = {"features": torch.rand(n_img, R, D, generator=g) * valid[..., None], "num_regions": num,
              "boxes": torch.cat([xy, xy + 1 + torch.rand(n_img, R, 2, generator=g) * 200], -1),
              "image_hw": torch.tensor([[480, 640]]).repeat(n_img, 1),
              "object_conf": torch.rand(n_img, R, generator=g) * valid,
              "object_id": torch.randint(0, 1600, (n_img, R), generator=g),
              "attribute_id": torch.randint(0, 400, (n_img, R), generator=g),
              "block_index": torch.randint(0, K * K, (n_img, R, L), generator=g),
              "block_weight": torch.softmax(torch.randn(n_img, R, L, generator=g), -1),
              "tag_vectors": torch.randn(n_img, R, bert_dim, generator=g), "index": torch.arange(n_img),
              "grid": torch.randn(n_img, grid_cells, grid_dim, generator=g).relu()}   # after relu5_4: ≥ 0
    lens = torch.randint(min_len, max_len + 1, (n_cap,), generator=g)
    tok = torch.randint(4, vocab, (n_cap, max_len), generator=g)
    pad = torch.arange(max_len)[None] >= lens[:, None]
    tok[pad] = 0
    bert = torch.randn(n_cap, max_len, bert_dim, generator=g)
    bert[pad] = 0
    captions = {"tokens": tok, "lengths": lens, "image_index": torch.arange(n_cap) % n_img,
                "index": torch.arange(n_cap), "bert": bert,
                "tree_labels": torch.randint(-1, 50, (n_cap, 7), generator=g),
                "concept_labels": (torch.rand(n_cap, n_concepts, generator=g) < 0.02).float()}
    captions["image_concept_labels"] = captions["concept_labels"]
    info = {"vocab_size": vocab, "feature_dim": D, "num_regions": R, "blocks_K": K, "blocks_L": L,
            "tag_dim": bert_dim, "bert_dim": bert_dim, "n_entities": 1440, "n_relations": 247,
            "grid_cells": grid_cells, "grid_dim": grid_dim, "n_concepts": n_concepts}
    return images, captions, info
