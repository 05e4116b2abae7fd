"""A picture like PFAN's Figure 6: test images, their most-attended regions and the blocks those attend.

For a test image and its first caption, with the trained PFAN (its t2i part when fused):

* position attention γ_ij of every region i over its L blocks (eq. 5–8, recomputed from the model's
  block embedding and M, exactly as :class:`itmatch.models.pfan.PositionAttention`);
* word→region attention α_wr of SCAN's t2i cross attention (leaky-ReLU 0.1 logits, l2-normalised over
  words, softmax over regions with the model's λ — see :mod:`itmatch.models.attention`).

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
import torch.nn.functional as F  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from itmatch.report.figures import save_figure  # noqa: E402


@torch.no_grad()
def pfan_attention(model, image: dict[str, torch.Tensor], caption: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """γ [R, L] (position attention), α [W, R] (word→region attention) for one image and one caption.

    ``image`` / ``caption``: collated batches of size 1 (``itmatch.training.data``); ``model``: a PFAN.
    """
    pos = model.position
    K2 = pos.K * pos.K
    feats, idx, w = image["features"], image["block_index"], image["block_weight"]
    b = pos.embed(idx.long().clamp(0, K2))  # [1, R, L, ι]
    beta = torch.tanh((b * (feats @ pos.M).unsqueeze(2)).sum(-1))  # [1, R, L]
    g0 = torch.softmax(beta, -1) * w
    gamma = g0 / g0.sum(-1, keepdim=True).clamp(min=1e-12) if pos.position_norm == "renorm" else torch.softmax(g0, -1)
    n = int(image["num_regions"][0])
    V = model.encode_images(image)["V"][0, :n]  # [n, d]
    length = int(caption["lengths"][0])
    E = model.encode_captions(caption)["E"][0, :length]  # [W, d]
    X = F.leaky_relu(E @ V.t(), 0.1)  # [W, n]
    X = X / (X.pow(2).sum(0, keepdim=True).sqrt() + 1e-8)  # over words
    alpha = torch.softmax(model.hp.get("lambda_softmax", 9.0) * X, dim=1)  # over regions
    return {"gamma": gamma[0, :n].numpy(), "index": idx[0, :n].numpy(), "alpha": alpha.numpy(),
            "boxes": image["boxes"][0, :n].numpy(), "K": np.int64(pos.K)}


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
    from itmatch.evaluation.evaluate import load_parts
    from itmatch.training.data import collate_captions, collate_images

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
