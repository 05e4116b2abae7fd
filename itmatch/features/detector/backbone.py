"""ResNet C4 backbone (stem + res2..res4) and the res5 stage used as the region head.

Module names follow detectron2 (``stem.conv1``, ``res2.0.conv1``, ``….norm``, ``….shortcut``) so the
published checkpoints map onto them key by key. Depth and width are configurable: 101 with 64-wide
bottlenecks for the real bottom-up-attention model, a few narrow blocks for the embedded demo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


@dataclass
class ResNetSpec:
    blocks: list[int]            # blocks in res2, res3, res4, res5
    stem_channels: int = 64
    res2_channels: int = 256     # output channels of res2 (doubles per stage)
    bottleneck_channels: int = 64  # bottleneck width in res2 (doubles per stage)
    stride_in_1x1: bool = True   # MSRA/caffe: stride in the first 1×1 conv
    res5_dilation: int = 1       # 2 = bottom-up attention's res5 (stride 1, dilated 3×3)
    stem_pool_ceil: bool = False  # caffe stem: 3×3/2 max pool without padding, ceil mode

    @classmethod
    def from_config(cls, arch: dict) -> ResNetSpec:
        blocks = arch.get("blocks_per_stage") or BLOCKS.get(arch.get("depth", 101))
        if blocks is None:
            raise ValueError(f"detector architecture: depth {arch.get('depth')!r} is not one of {sorted(BLOCKS)} "
                             "and no blocks_per_stage is given")
        return cls(blocks=list(blocks), stem_channels=arch.get("stem_channels", 64),
                   res2_channels=arch.get("res2_channels", 256),
                   bottleneck_channels=arch.get("bottleneck_channels", 64),
                   stride_in_1x1=arch.get("stride_in_1x1", True), res5_dilation=arch.get("res5_dilation", 1),
                   stem_pool_ceil=arch.get("stem_pool_ceil", False))

    @property
    def res4_channels(self) -> int:
        return self.res2_channels * 4

    @property
    def res5_channels(self) -> int:
        return self.res2_channels * 8


class ConvNorm(nn.Conv2d):
    """Conv without bias followed by batch norm, stored as ``conv.weight`` + ``conv.norm.*`` (detectron2 layout)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, dilation: int = 1):
        super().__init__(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int, dilation: int, stride_in_1x1: bool):
        super().__init__()
        self.shortcut = ConvNorm(cin, cout, 1, stride=stride) if cin != cout or stride != 1 else None
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvNorm(cin, mid, 1, stride=s1)
        self.conv2 = ConvNorm(mid, mid, 3, stride=s3, padding=dilation, dilation=dilation)
        self.conv3 = ConvNorm(mid, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place, as detectron2's BottleneckBlock (same values, fewer passes over memory)
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out += self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out)


def make_stage(n: int, cin: int, mid: int, cout: int, stride: int, dilation: int, stride_in_1x1: bool) -> nn.Sequential:
    return nn.Sequential(*[Bottleneck(cin if i == 0 else cout, mid, cout, stride if i == 0 else 1, dilation,
                                      stride_in_1x1) for i in range(n)])


class Stem(nn.Module):
    def __init__(self, cout: int, pool_ceil: bool):
        super().__init__()
        self.conv1 = ConvNorm(3, cout, 7, stride=2, padding=3)
        self.pool_ceil = pool_ceil

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        if self.pool_ceil:
            return F.max_pool2d(x, 3, 2, 0, ceil_mode=True)
        return F.max_pool2d(x, 3, 2, 1)


class ResNetC4(nn.Module):
    """Image ``[B, 3, H, W]`` → res4 map ``[B, res4_channels, H/16, W/16]``."""

    stride = 16

    def __init__(self, spec: ResNetSpec):
        super().__init__()
        self.stem = Stem(spec.stem_channels, spec.stem_pool_ceil)
        cin, mid, cout = spec.stem_channels, spec.bottleneck_channels, spec.res2_channels
        for i, name in enumerate(("res2", "res3", "res4")):
            setattr(self, name, make_stage(spec.blocks[i], cin, mid, cout, 1 if i == 0 else 2, 1,
                                           spec.stride_in_1x1))
            cin, mid, cout = cout, mid * 2, cout * 2
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res4(self.res3(self.res2(self.stem(x))))

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Size of the res4 map of an ``h × w`` image (its part of a padded batch's map)."""
        def one(x: int) -> int:
            x = (x - 1) // 2 + 1  # 7×7/2 conv, padding 3
            x = -(-(x - 3) // 2) + 1 if self.stem.pool_ceil else (x - 1) // 2 + 1  # 3×3/2 max pool
            return ((x - 1) // 2) // 2 + 1  # res3, res4: stride 2 each
        return one(h), one(w)


def make_res5(spec: ResNetSpec) -> nn.Sequential:
    """res5 applied to pooled regions: stride 2, or stride 1 with dilation 2 (bottom-up attention)."""
    d = spec.res5_dilation
    return make_stage(spec.blocks[3], spec.res4_channels, spec.bottleneck_channels * 8, spec.res5_channels,
                      1 if d > 1 else 2, d, spec.stride_in_1x1)
