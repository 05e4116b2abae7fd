"""A picture like PFAN's Figure 6: test images, their most-attended regions and the blocks those attend.

For a test image and its first caption, with the trained PFAN (its t2i part when fused):

* position attention γ_ij of every region i over its L blocks (eq. 5–8:
  :meth:`itmatch.models.pfan.PositionAttention.weights`);
* word→region attention α_wr of SCAN's t2i cross attention with the model's λ and raw-logit
  normalisation (:func:`itmatch.models.attention.attention_weights`).

Shown, as in the paper's figure: the ``n_regions`` regions with the largest attention from any word
(green boxes), each labelled with the word that attends to it most, and per region its ``n_blocks``
blocks with the largest γ (red frames, brighter = larger weight; the paper shows 6).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from itmatch.corpus.data import collate_captions, collate_images
from itmatch.models.attention import attention_weights  # noqa: E402
from itmatch.models.checkpoint import load_parts
from itmatch.report.figures import save_figure  # noqa: E402


@torch.no_grad()
def pfan_attention(model, image: dict[str, torch.Tensor], caption: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """γ [R, L] (position attention), α [W, R] (word→region attention) for one image and one caption.

    ``image`` / ``caption``: collated batches of size 1 (``itmatch.corpus.data``); ``model``: a PFAN.
    """
    idx = image["block_index"]
    gamma, _ = model.position.weights(image["features"], idx, image["block_weight"])  # [1, R, L]
    n = int(image["num_regions"][0])
    V = model.encode_images(image)["V"][:, :n]  # [1, n, d]
    E = model.encode_captions(caption)["E"][:, : int(caption["lengths"][0])]  # [1, W, d]
    hp = model.hp
    alpha = attention_weights(E, V, hp["lambda_softmax"], hp["raw_norm"])[0]  # [W, n]
    return {"gamma": gamma[0, :n].numpy(), "index": idx[0, :n].numpy(), "alpha": alpha.numpy(),
            "boxes": image["boxes"][0, :n].numpy(), "K": np.int64(model.position.K)}


def select(att: dict[str, np.ndarray], words: list[str], n_regions: int, n_blocks: int) -> list[dict[str, Any]]:
    """The regions most attended by any word, each with its top word and top blocks (weight-sorted)."""
    alpha, gamma, index, K = att["alpha"], att["gamma"], att["index"], int(att["K"])
    peak = alpha.max(0)  # [R]
    out = []
    for r in np.argsort(-peak, kind="stable")[:n_regions]:
        valid = index[r] < K * K
        order = [j for j in np.argsort(-gamma[r], kind="stable") if valid[j]][:n_blocks]
        out.append({"region": int(r), "box": [float(v) for v in att["boxes"][r]],
                    "word": words[int(alpha[:, r].argmax())], "attention": float(peak[r]),
                    "blocks": [(int(index[r, j]), float(gamma[r, j])) for j in order]})
    return out


def draw(ax, image: np.ndarray, caption: str, picks: list[dict[str, Any]], K: int) -> None:
    """One panel: the image, green region boxes with their words, red block frames (alpha ∝ weight)."""
    H, W = image.shape[:2]
    ax.imshow(image)
    for p in picks:
        top = max((g for _, g in p["blocks"]), default=1.0) or 1.0
        for cell, g in p["blocks"]:
            xc, yc = divmod(cell, K)  # cell index = x_cell·K + y_cell
            ax.add_patch(Rectangle((xc * W / K, yc * H / K), W / K, H / K, fill=True, facecolor="red",
                                   edgecolor="red", lw=1.5, alpha=0.15 + 0.6 * g / top))
        x1, y1, x2, y2 = p["box"]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", lw=2))
        ax.text(x1 + 1, y1 + 1, p["word"], color="black", fontsize=8, va="top",
                bbox={"facecolor": "lime", "edgecolor": "none", "pad": 1})
    ax.set_title("\n".join(textwrap.wrap(caption, 40)), fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def pfan_figure(checkpoint: str | Path, corpus, image_dir: str | Path, vocab_words: list[str],
                out_png: str | Path, n_images: int = 2, n_regions: int = 3, n_blocks: int = 6
                ) -> list[dict[str, Any]]:
    """Figure 6 for the first ``n_images`` test images (first caption each); returns what was drawn."""

    name, parts = load_parts(str(checkpoint))
    if name != "pfan":
        raise ValueError(f"{checkpoint}: a {name!r} checkpoint, not PFAN")
    model = next((m for m in parts if getattr(m, "direction", None) == "t2i"), parts[0])
    files = pd.read_parquet(corpus.paths.images, columns=["file"])["file"].tolist()
    rows = corpus.rows("test", "images")[:n_images]
    if len(rows) == 0:
        raise ValueError(f"{corpus.paths.images}: no test images")
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 4.8), squeeze=False, constrained_layout=True)
    drawn = []
    for ax, row in zip(axes[0], rows, strict=True):
        cap_row = int(np.flatnonzero(corpus.caption_image == row)[0])
        item = corpus.caption_item(cap_row)
        words = [vocab_words[int(t)] for t in item["tokens"]]
        att = pfan_attention(model, collate_images([corpus.image_item(int(row))]), collate_captions([item]))
        picks = select(att, words, n_regions, n_blocks)
        with Image.open(Path(image_dir) / files[int(row)]) as im:
            draw(ax, np.asarray(im.convert("RGB")), " ".join(words), picks, int(att["K"]))
        drawn.append({"image_row": int(row), "caption_row": cap_row, "regions": picks})
    fig.suptitle("PFAN: most-attended regions (green, with their word) and the blocks they attend (red)",
                 fontsize=9)
    save_figure(fig, out_png)
    return drawn
