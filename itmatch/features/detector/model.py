"""The bottom-up-attention Faster R-CNN (ResNet C4): backbone, RPN, region head. Pure PyTorch."""

from __future__ import annotations

import torch
from torch import nn

from itmatch.features.detector.backbone import ResNetC4, ResNetSpec
from itmatch.features.detector.heads import RegionHead
from itmatch.features.detector.rpn import RPN


class BottomUpDetector(nn.Module):
    """``arch`` (a config dict) fixes depth, widths, anchors, pooling and class counts (background included)."""

    def __init__(self, arch: dict):
        super().__init__()
        self.arch = dict(arch)
        spec = ResNetSpec.from_config(arch)
        self.backbone = ResNetC4(spec)
        self.rpn = RPN(self.backbone.out_channels, arch)
        self.roi_heads = RegionHead(spec, arch)
        self.stride = ResNetC4.stride
        self.box_weights = tuple(arch.get("box_reg_weights", [10.0, 10.0, 5.0, 5.0]))

    @property
    def feature_dim(self) -> int:
        return self.roi_heads.out_channels

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


def build_model(arch: dict) -> BottomUpDetector:
    required = ["num_object_classes", "num_attribute_classes", "anchor_sizes", "anchor_ratios", "rpn_channels",
                "pooler_resolution", "attribute_embed_dim", "attribute_hidden_dim"]
    missing = [k for k in required if k not in arch]
    if missing:
        raise ValueError(f"detector architecture is missing keys: {', '.join(missing)}")
    return BottomUpDetector(arch)
