"""A SCAN/PFAN precomp folder made from the committed real captions (tests/fixtures/precomp) and seeded arrays.

The committed ``f30k_test_caps.txt`` holds 1000 real captions of 200 Flickr30K images; they are split in file
order into train / dev / test, written as ``{prefix}_caps.txt`` (+ ``_ids.txt``), with seeded float32 features of
the real shape [36, 2048] in ``{prefix}_ims.npy`` and PFAN position files ``{prefix}_boxes.npy`` (float64
[images, 36, 30] as PFAN's: 15 cells of a 16 × 16 grid from seeded boxes by our block index, then their weights).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from itmatch.features.blocks import compute_blocks

FIX = Path(__file__).parent / "fixtures" / "precomp"
CAPTIONS = FIX / "f30k_test_caps.txt"
VOCAB = FIX / "f30k_precomp_vocab.json"
FIRST_IMAGE_ID = 200  # the fixture's captions are those of SCAN's test images 200..399 (README there)


def pfan_boxes(n: int, regions: int, rng: np.random.Generator, K: int = 16, L: int = 15) -> np.ndarray:
    """PFAN's position layout [n, regions, 2L] (float64) of seeded boxes on 500 × 375 images."""
    hw = np.tile(np.array([[375, 500]], np.int32), (n, 1))
    xy = rng.uniform(0, 1, (n, regions, 2, 2))
    lo, hi = xy.min(2), xy.max(2) + 0.05
    boxes = np.concatenate([lo, np.minimum(hi, 1.0)], -1) * np.array([500, 375, 500, 375])
    index, weight, _ = compute_blocks(boxes.astype(np.float32), hw, K, L)
    return np.concatenate([index.astype(np.float64), weight.astype(np.float64)], -1)


def make_precomp_folder(root: Path, splits: tuple[tuple[str, int], ...] = (("train", 140), ("dev", 30), ("test", 30)),
                        dim: int = 2048, regions: int = 36, seed: int = 0, boxes: bool = True, ids: bool = True,
                        per_caption: tuple[str, ...] = ("dev",), signal: float = 0.0) -> Path:
    """Write the folder; ``per_caption``: prefixes whose ``_ims.npy`` repeats each image once per caption (as
    SCAN's F30K dev); ``signal`` > 0 adds a per-image pattern shared by its regions (so training can learn)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = CAPTIONS.read_text(encoding="utf-8").splitlines()
    rng = np.random.default_rng(seed)
    start = 0
    for prefix, n in splits:
        caps = lines[5 * start:5 * (start + n)]
        assert len(caps) == 5 * n, "the fixture has 200 images"
        (root / f"{prefix}_caps.txt").write_text("\n".join(caps) + "\n", encoding="utf-8")
        feats = rng.random((n, regions, dim), dtype=np.float32)
        if signal:
            feats += signal * rng.standard_normal((n, 1, dim), dtype=np.float32)
        if prefix in per_caption:
            feats = np.repeat(feats, 5, axis=0)
        np.save(root / f"{prefix}_ims.npy", feats)
        if ids:
            (root / f"{prefix}_ids.txt").write_text(
                "".join(f"{FIRST_IMAGE_ID + start + i}\n" for i in range(n)), encoding="utf-8")
        if boxes:
            np.save(root / f"{prefix}_boxes.npy", pfan_boxes(n, regions, rng))
        start += n
    return root
