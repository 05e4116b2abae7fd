"""Region head: ROI pooling (torchvision) → res5 → mean pool → box/class predictor and the attribute head.

Class index 0 is background in both classifiers (caffe bottom-up-attention layout: 1601 object logits =
background + 1600, 401 attribute logits = "no attribute" + 400).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align, roi_pool

from itmatch.features.detector.backbone import ResNetSpec, make_res5

POOLERS = ("pool", "align")


class BoxPredictor(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(dim, num_classes)
        self.bbox_pred = nn.Linear(dim, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class AttributeHead(nn.Module):
    """Attribute logits from [pooled feature ; embedding of the object class] → hidden (ReLU) → logits."""

    def __init__(self, dim: int, embed_classes: int, embed_dim: int, hidden: int, num_attributes: int):
        super().__init__()
        self.cls_embed = nn.Embedding(embed_classes, embed_dim)
        self.fc = nn.Linear(dim + embed_dim, hidden)
        self.score = nn.Linear(hidden, num_attributes)
        nn.init.normal_(self.cls_embed.weight, std=0.01)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.normal_(self.score.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        nn.init.zeros_(self.score.bias)

    def forward(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self.score(F.relu(self.fc(torch.cat([x, self.cls_embed(classes)], dim=1))))


class RegionHead(nn.Module):
    """``pooler_type``: ``pool`` = torchvision ``roi_pool`` (caffe's ROIPool; the reference's detectron2
    ``ROIPooler`` with ``POOLER_TYPE: ROIPool`` is torchvision's ``RoIPool``) or ``align`` = torchvision
    ``roi_align`` with ``aligned=True`` and ``pooler_sampling_ratio`` samples per bin side (the demo)."""

    def __init__(self, spec: ResNetSpec, arch: dict):
        super().__init__()
        self.res5 = make_res5(spec)
        dim = spec.res5_channels
        self.box_predictor = BoxPredictor(dim, arch["num_object_classes"])
        self.attribute_head = AttributeHead(dim, arch.get("attribute_embed_classes") or arch["num_object_classes"],
                                            arch["attribute_embed_dim"], arch["attribute_hidden_dim"],
                                            arch["num_attribute_classes"])
        self.pooler_resolution = arch["pooler_resolution"]
        self.sampling_ratio = arch.get("pooler_sampling_ratio", 2)
        self.pooler_type = arch.get("pooler_type", "align")
        if self.pooler_type not in POOLERS:
            raise ValueError(f"detector architecture: pooler_type {self.pooler_type!r} is not one of {POOLERS}")
        self.out_channels = dim

    def pool(self, feats: torch.Tensor, boxes: list[torch.Tensor], stride: int) -> torch.Tensor:
        """ROI-pooled map ``[R, C, S, S]`` of the given boxes (image pixels, per image)."""
        boxes = [b.to(feats.dtype) for b in boxes]
        if self.pooler_type == "pool":
            return roi_pool(feats, boxes, self.pooler_resolution, 1.0 / stride)
        return roi_align(feats, boxes, self.pooler_resolution, 1.0 / stride, self.sampling_ratio, aligned=True)

    def pooled_features(self, feats: torch.Tensor, boxes: list[torch.Tensor], stride: int) -> torch.Tensor:
        """Mean-pooled res5 features ``[R, D]`` of the given boxes (image pixels, per image)."""
        return self.res5(self.pool(feats, boxes, stride)).mean(dim=(2, 3))
