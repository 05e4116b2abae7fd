"""A synthetic dataset laid out exactly like COCO at a chosen fraction of its size, for the scale rehearsal.

    .venv/bin/python benchmarks/scale/make_dataset.py --scale 0.01 --out scale_runs/data/scale1

Writes, under ``--out``:

* ``dataset.json``: Karpathy format with COCO's split proportions (113,287 train incl. restval, 5,000 val, 5,000
  test at ``--scale 1``), ``cocoid`` ids and 5 sentences per image with ``raw``, ``tokens``, ``sentid`` and the
  gold ``parse`` / ``lemmas`` of the ``shapes`` caption grammar (:mod:`itmatch.data.shapes`), its 6 nouns and 6
  colours replaced, per image, by pseudo-words drawn Zipf-like from ``--nouns`` / ``--adjectives`` lists, so the
  vocabulary grows with the dataset to COCO's order (≈10k words at full size);
* ``images/{train2014,val2014}/COCO_*_<id>.jpg``: hard links to one small JPEG per folder (ingest checks that
  every image exists; nothing reads pixels: the regions are given);
* ``regions.h5``: the contract's regions file (imported with ``extraction.import.<dataset>: {format: h5}``):
  36 regions per image, float16 2048-d features (a pool of random non-negative blocks, rows rotated per image),
  valid boxes inside COCO-like image sizes, object ids drawn Zipf-like over 1,600 names, each object's attribute
  among 20 of the 400 attribute names (≤ 32,000 distinct tag phrases, as correlated as real detections).

Deterministic for a given ``--seed`` and size. The captions are made in ``--processes`` worker processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from itmatch.data import shapes
from itmatch.features.regions_io import RegionsMeta, create_regions
from itmatch.utils.io import atomic_path

COCO = {"train": 113_287, "val": 5_000, "test": 5_000}  # Karpathy splits (train = train + restval)
R, D = 36, 2048
N_OBJECTS, N_ATTRIBUTES = 1600, 400  # Visual Genome's bottom-up-attention classes
ATTRIBUTES_PER_OBJECT = 20
ONSETS = "b c d f g h j k l m n p r s t v w z br ch cl dr fl gr pl sh sk st tr".split()
VOWELS = "a e i o u ai ea oo".split()


def pseudo_words(n: int, seed: int) -> list[str]:
    """``n`` distinct pronounceable lowercase words (2–3 syllables), deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        k = int(rng.integers(2, 4))
        w = "".join(ONSETS[int(rng.integers(len(ONSETS)))] + VOWELS[int(rng.integers(len(VOWELS)))]
                    for _ in range(k))
        out.setdefault(w, None)
    return list(out)


def zipf_choice(rng: np.random.Generator, n: int, size: int | None = None, a: float = 1.05) -> Any:
    """Indices in [0, n) with probability ∝ 1 / (rank + 1)^a."""
    p = 1.0 / np.arange(1, n + 1) ** a
    return rng.choice(n, size=size, p=p / p.sum())


def _widen(tree: Any, nouns: dict[str, str], adjs: dict[str, str]) -> Any:
    """The caption tree with each shapes noun / colour replaced by this image's pseudo-word."""
    if len(tree) == 3 and isinstance(tree[1], str):
        tag, word, lemma = tree
        if tag in ("NN", "NNS") and lemma in nouns:
            new = nouns[lemma]
            return (tag, new + "s" if tag == "NNS" else new, new)
        if tag == "JJ" and word in adjs:
            return (tag, adjs[word], adjs[word])
        return tree
    return (tree[0], [_widen(c, nouns, adjs) for c in tree[1]])


_WORDS: tuple[list[str], list[str]] | None = None


def _init(nouns: list[str], adjectives: list[str]) -> None:
    global _WORDS
    _WORDS = (nouns, adjectives)


def _sentences(args: tuple[int, int]) -> list[dict[str, Any]]:
    """The 5 caption records of image ``index`` (a pure function of seed and index)."""
    seed, index = args
    nouns, adjectives = _WORDS
    spec = shapes.ShapesSpec(seed=seed, image_size=160)
    rng = np.random.default_rng([seed, index])
    objects = shapes._place_objects(rng, spec)
    cands = shapes.caption_candidates(rng, objects, spec.image_size)
    picked = shapes.choose_captions(rng, cands, 5)
    noun_map = {syn: nouns[int(zipf_choice(rng, len(nouns)))] for syns in shapes.CATEGORIES.values() for syn in syns}
    adj_map = {c: adjectives[int(zipf_choice(rng, len(adjectives)))] for c in shapes.COLOURS}
    return [shapes.sentence_record(_widen(t, noun_map, adj_map)) for t in picked]


def split_sizes(scale: float) -> dict[str, int]:
    return {s: max(1, round(n * scale)) for s, n in COCO.items()}


def write_json(out: Path, sizes: dict[str, int], seed: int, nouns: list[str], adjectives: list[str],
               processes: int) -> list[tuple[int, str, str]]:
    """dataset.json; returns (cocoid, folder, filename) per image in JSON order."""
    splits = [s for s in ("train", "val", "test") for _ in range(sizes[s])]
    jobs = [(seed, i) for i in range(len(splits))]
    with mp.get_context("fork").Pool(processes, _init, (nouns, adjectives)) as pool:
        sentences = pool.map(_sentences, jobs, chunksize=512)
    images, files, sentid = [], [], 0
    for i, (split, sents) in enumerate(zip(splits, sentences, strict=True)):
        cocoid = 100_000 + i
        folder = "val2014" if split != "train" or i % 4 == 3 else "train2014"  # restval images live in val2014
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        json_split = "restval" if split == "train" and folder == "val2014" else split
        for s in sents:
            s["sentid"], s["imgid"] = sentid, i
            sentid += 1
        images.append({"filepath": folder, "filename": filename, "imgid": i, "cocoid": cocoid, "split": json_split,
                       "sentids": [s["sentid"] for s in sents], "sentences": sents})
        files.append((cocoid, folder, filename))
    with atomic_path(out / "dataset.json") as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"dataset": "coco", "images": images}, fh, separators=(",", ":"))
    return files


def write_images(out: Path, files: list[tuple[int, str, str]]) -> None:
    """Hard links to one small JPEG per folder (a new source file every 50,000 links: ext4's link limit)."""
    root = out / "images"
    made: dict[tuple[str, int], Path] = {}
    for k, (_, folder, filename) in enumerate(files):
        (root / folder).mkdir(parents=True, exist_ok=True)
        key = (folder, k // 50_000)
        if key not in made:
            made[key] = root / f".{folder}-{key[1]}.jpg"
            Image.new("RGB", (64, 48), (120, 110, 100)).save(made[key], quality=80)
        target = root / folder / filename
        if not target.exists():
            os.link(made[key], target)


def write_regions(out: Path, image_ids: np.ndarray, nouns: list[str], adjectives: list[str], seed: int,
                  block: int = 256, pool: int = 64) -> None:
    """regions.h5 of the contract, written block by block (bounded memory at any size)."""
    n = len(image_ids)
    rng = np.random.default_rng(seed + 1)
    pool_feats = np.abs(rng.standard_normal((pool, R, D), dtype=np.float32)).astype(np.float16)
    meta = RegionsMeta(detector="scale-rehearsal (random)", weights_sha256="0" * 64, feature_dim=D,
                       object_names=nouns[:N_OBJECTS], attribute_names=adjectives[:N_ATTRIBUTES])
    with atomic_path(out / "regions.h5") as tmp:
        with create_regions(tmp, n, R, meta, image_ids=image_ids) as f:
            for s in range(0, n, block):
                e = min(n, s + block)
                b = e - s
                rows = np.arange(s, e)
                feats = pool_feats[rows % pool]
                feats = np.stack([np.roll(x, int(k), axis=0) for x, k in zip(feats, (rows // pool) % R, strict=True)])
                h = rng.integers(320, 641, b)
                w = np.full(b, 640)
                x1 = rng.uniform(0, 0.8, (b, R)) * w[:, None]
                y1 = rng.uniform(0, 0.8, (b, R)) * h[:, None]
                x2 = x1 + rng.uniform(0.05, 1.0, (b, R)) * (w[:, None] - x1)
                y2 = y1 + rng.uniform(0.05, 1.0, (b, R)) * (h[:, None] - y1)
                f["features"][s:e] = feats
                f["boxes"][s:e] = np.stack([x1, y1, x2, y2], 2).astype(np.float32)
                f["image_hw"][s:e] = np.stack([h, w], 1).astype(np.int32)
                obj = zipf_choice(rng, N_OBJECTS, (b, R))
                # attributes depend on the object, as in Visual Genome ("green tree", "white plate"): each object
                # has its own ATTRIBUTES_PER_OBJECT attributes, so distinct tag phrases stay in the tens of thousands
                att = (obj * 7 + 13 * zipf_choice(rng, ATTRIBUTES_PER_OBJECT, (b, R))) % N_ATTRIBUTES
                f["object_id"][s:e] = obj.astype(np.int16)
                f["attribute_id"][s:e] = att.astype(np.int16)
                f["object_conf"][s:e] = rng.uniform(0.2, 1.0, (b, R)).astype(np.float16)
                f["attribute_conf"][s:e] = rng.uniform(0.1, 1.0, (b, R)).astype(np.float16)
                f["num_regions"][s:e] = R


def make_dataset(out: str | Path, scale: float, seed: int = 0, n_nouns: int = 12_000, n_adjectives: int = 3_000,
                 processes: int = 2) -> dict[str, Any]:
    """Write dataset.json, the image links and regions.h5 under ``out``; returns the sizes and seconds."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    words = pseudo_words(n_nouns + n_adjectives, seed)
    nouns, adjectives = words[:n_nouns], words[n_nouns:]
    sizes = split_sizes(scale)
    files = write_json(out, sizes, seed, nouns, adjectives, processes)
    t1 = time.perf_counter()
    write_images(out, files)
    t2 = time.perf_counter()
    write_regions(out, np.array([c for c, _, _ in files], dtype=np.int64), nouns, adjectives, seed)
    t3 = time.perf_counter()
    info = {"scale": scale, "images": len(files), "captions": 5 * len(files), **sizes,
            "seconds": {"json": round(t1 - t0, 1), "images": round(t2 - t1, 1), "regions": round(t3 - t2, 1)}}
    (out / "made.json").write_text(json.dumps(info, indent=1))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, required=True, help="fraction of COCO's size (1 = 123,287 images)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--processes", type=int, default=2)
    a = ap.parse_args()
    print(json.dumps(make_dataset(a.out, a.scale, a.seed, processes=a.processes)))


if __name__ == "__main__":
    main()
