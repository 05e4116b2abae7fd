"""The interface every matching model implements, and the batch layout the data loaders produce.

A model turns an image batch and a caption batch into representations, and scores every image of
one against every caption of the other::

    img = model.encode_images(images)        # leading dim I
    cap = model.encode_captions(captions)    # leading dim C
    sim = model.score(img, cap)              # [I, C] float32

Training batches are aligned pairs (caption j describes image j, so the positives are the diagonal of
``score``); evaluation encodes all test images and captions in chunks and fills the full [I, C] matrix
shard by shard (``itmatch.evaluation``). Models whose attention depends on the pair (SCAN, PFAN,
CAAN, BSSAN, GLFN) do the cross-modal work inside ``score``; global-vector models (SMFEA) return
vectors and ``score`` is a matrix product.

Image batch keys (tensors; B images, R regions, D feature dim, L blocks per region):
    features       float32 [B, R, D]   pooled region features (regions.h5)
    num_regions    int64   [B]         valid regions; rows past it are zero
    boxes          float32 [B, R, 4]   x1, y1, x2, y2 in original pixels
    image_hw       int64   [B, 2]
    object_id      int64   [B, R]      detector tags (no background)
    attribute_id   int64   [B, R]
    object_conf    float32 [B, R]
    block_index    int64   [B, R, L]   blocks.h5 (padding = K²)          — when "blocks" in requires
    block_weight   float32 [B, R, L]
    tag_vectors    float32 [B, R, H]   BERT vector of each region's tag   — when "tags" in requires
    grid           float32 [B, G, C]   VGG-19 conv5_4 cells (grid.h5)       — when "grid" in requires
    (``objects`` in a model's inputs: it reads ``object_conf``, the detector's confidences, which features
    imported without tags — SCAN's .npy — do not have; no extra file)
    index          int64   [B]         row in images.parquet

Caption batch keys (C captions, W = longest caption in the batch):
    tokens         int64   [C, W]      vocabulary ids, 0 = <pad> (tokens.parquet)
    lengths        int64   [C]
    bert           float32 [C, W, H]   per-token BERT features             — when "bert" in requires
    tree_labels    int64   [C, 7]      entity-or-relation id, -1 = null   — when "trees" in requires
    concept_labels float32 [C, K]      the caption's concepts, multi-hot   — when "concepts" in inputs
    image_concept_labels float32 [C, K]  its image's (union over the image's captions)
    image_index    int64   [C]         row of the caption's image in images.parquet
    index          int64   [C]         row in captions.parquet
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


class MatchingModel(nn.Module):
    """Base class: subclasses implement the three methods below; ``loss`` has a default."""

    #: optional inputs this model needs, beyond regions.h5 and tokens.parquet (see :meth:`inputs`)
    requires: frozenset[str] = frozenset()

    @classmethod
    def inputs(cls, cfg: dict[str, Any]) -> frozenset[str]:
        """The optional inputs a model built from ``cfg`` (its resolved config block) reads; the workflow asks
        for exactly these artifacts. Default: the class's ``requires``; a model whose inputs depend on its
        settings overrides this."""
        return cls.requires

    def prepare_training(self, corpus: Any) -> None:
        """Called once on a freshly built model before training starts (not when a checkpoint is loaded):
        initialisation from pretrained resources (BSSAN: GloVe word vectors). Default: nothing."""

    def encode_images(self, images: Batch) -> Any:
        raise NotImplementedError

    def encode_captions(self, captions: Batch) -> Any:
        raise NotImplementedError

    def score(self, img: Any, cap: Any) -> torch.Tensor:
        """[I, C] similarities of every encoded image with every encoded caption."""
        raise NotImplementedError

    def loss(self, images: Batch, captions: Batch, criterion: nn.Module) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss on aligned pairs; default: ``criterion`` on the [B, B] score matrix."""
        sim = self.score(self.encode_images(images), self.encode_captions(captions))
        loss = criterion(sim)
        return loss, {"rank_loss": float(loss.detach())}


def chunked_pair_scores(img: dict[str, torch.Tensor], cap: dict[str, torch.Tensor], pair_chunk: int,
                        block_fn: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor],
                        prep_img: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
                        ) -> torch.Tensor:
    """[I, C] scores of every image of ``img`` with every caption of ``cap`` (dicts of tensors with the
    leading dim I / C, both holding a ``mask``), ``block_fn(img_block, cap_block)`` → [i, c] on blocks of
    ≤ ``pair_chunk`` pairs: whole caption blocks of min(C, pair_chunk) captions, as many images as fit.
    Blocks are slices (views, no copies); ``prep_img`` is applied to each image block once."""
    n_img, n_cap = img["mask"].shape[0], cap["mask"].shape[0]
    cc = min(n_cap, pair_chunk)
    ci = max(1, pair_chunk // cc)
    rows = []
    for i0 in range(0, n_img, ci):
        ib = {k: v[i0:i0 + ci] for k, v in img.items()}
        if prep_img is not None:
            ib = prep_img(ib)
        cols = [block_fn(ib, {k: v[c0:c0 + cc] for k, v in cap.items()}) for c0 in range(0, n_cap, cc)]
        rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0)
