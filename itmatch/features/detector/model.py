"""The bottom-up-attention Faster R-CNN (ResNet C4) as one module: backbone, RPN, region head.

:meth:`BottomUpDetector.forward` is the reference's test-time forward in extraction mode
(MILVLG/bottom-up-attention.pytorch 4dbce86: ``GeneralizedBUARCNN.inference`` with ``EXTRACT_FEATS`` →
``BUACaffeRes5ROIHeads.forward``): per image the RPN proposals and, for every proposal, the res5 mean-pooled
feature, class probabilities, box deltas and attribute probabilities (the attribute head is given the
arg-max over *all* class logits, background included, as the reference's ``BUACaffeFastRCNNOutputLayers``).
Region selection on top of it is :func:`itmatch.features.detector.inference.select_regions`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from itmatch.features.detector.backbone import ResNetC4, ResNetSpec
from itmatch.features.detector.boxes import CONVENTIONS
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
        self.convention = arch.get("box_convention", "continuous")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"detector architecture: box_convention {self.convention!r} is not one of {CONVENTIONS}")

    @property
    def feature_dim(self) -> int:
        return self.roi_heads.out_channels

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, batch: torch.Tensor, image_hw: list[tuple[int, int]], scales: list[float], pre_nms: int,
                post_nms: int, stages: bool = False) -> list[dict[str, torch.Tensor]]:
        """Proposal-level outputs of a zero-padded batch ``[B, 3, H, W]`` (each image's own size in ``image_hw``,
        its resize factor in ``scales``). Per image: ``proposals`` [P, 4] (resized-image pixels), ``proposal_scores``
        [P] (RPN foreground probability), ``features`` [P, D], ``cls_prob`` [P, C+1], ``box_deltas``
        [P, (C+1)·4], ``attr_prob`` [P, A+1], ``feature_map`` [1, C4, H/16, W/16] (the padded batch's res4 map);
        with ``stages``, also ``res4`` [C4, h, w] (the image's part of the padded map), the RPN head's raw
        ``rpn_logits`` [2A, h, w] and ``rpn_deltas`` [4A, h, w] (channel 4a + k: delta k of anchor a) and
        ``pooled`` [P, C4, S, S] (ROI-pooled res4)."""
        res4 = self.features(batch)
        rpn = self.rpn(res4, image_hw, scales, self.stride, pre_nms, post_nms)
        proposals = rpn["proposals"]
        pooled = self.roi_heads.pool(res4, proposals, self.stride)
        feats = self.roi_heads.res5(pooled).mean(dim=(2, 3))
        logits, deltas = self.roi_heads.box_predictor(feats)
        attr_logits = self.roi_heads.attribute_head(feats, torch.argmax(logits, dim=1))
        cls_prob, attr_prob = F.softmax(logits.float(), dim=-1), F.softmax(attr_logits.float(), dim=-1)
        out, start = [], 0
        for i, boxes in enumerate(proposals):
            sl = slice(start, start + len(boxes))
            start += len(boxes)
            d = {"proposals": boxes, "proposal_scores": rpn["scores"][i], "features": feats[sl].float(),
                 "cls_prob": cls_prob[sl], "box_deltas": deltas[sl].float(), "attr_prob": attr_prob[sl],
                 "feature_map": res4[i:i + 1]}
            if stages:
                fh, fw = self.backbone.output_size(*image_hw[i])
                d["res4"] = res4[i, :, :fh, :fw]
                d["rpn_logits"] = rpn["logits"][i, :, :fh, :fw]
                a = rpn["logits"].shape[1] // 2
                deltas_map = rpn["deltas"][i].view(res4.shape[2], res4.shape[3], a, 4).permute(2, 3, 0, 1)
                d["rpn_deltas"] = deltas_map.reshape(4 * a, res4.shape[2], res4.shape[3])[:, :fh, :fw]
                d["pooled"] = pooled[sl]
            out.append(d)
        return out


def build_model(arch: dict) -> BottomUpDetector:
    required = ["num_object_classes", "num_attribute_classes", "anchor_ratios", "rpn_channels",
                "pooler_resolution", "attribute_embed_dim", "attribute_hidden_dim"]
    missing = [k for k in required if k not in arch]
    if arch.get("anchor_style", "sizes") == "caffe":
        missing += [k for k in ("anchor_scales",) if k not in arch]
    else:
        missing += [k for k in ("anchor_sizes",) if k not in arch]
    if missing:
        raise ValueError(f"detector architecture is missing keys: {', '.join(missing)}")
    return BottomUpDetector(arch)
