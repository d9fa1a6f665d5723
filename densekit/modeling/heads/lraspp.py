"""Lite R-ASPP (Howard et al., "Searching for MobileNetV3", ICCV 2019): the MobileNetV3 segmentation head.

On the stride-16 feature, a 1x1 conv + BN + ReLU branch is gated by a squeeze-excitation-like branch (pooling,
1x1 conv, sigmoid); the product is upsampled to the stride-8 feature and classified, and a 1x1 classifier on the
stride-8 feature adds the finer detail. The paper pools with a 49x49 kernel at stride (16, 20) (trained on
769x769 crops); this head follows torchvision and pools globally, which is what torchvision's weights expect.

Sub-module names (``cbr``, ``scale``, ``low_classifier``, ``high_classifier``) are torchvision's, so its
``classifier.*`` tensors load under ``head.*`` unchanged (see
:func:`densekit.checkpoint.convert.convert_torchvision_lraspp`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import SEG_HEADS


class LRASPPHead(nn.Module):
    """Lite R-ASPP over a stride-8 ("low") and a stride-16 ("high") feature.

    Args:
        low_channels: Channels of the stride-8 feature.
        high_channels: Channels of the stride-16 feature.
        num_classes: Output classes.
        inter_channels: Width of the gated stride-16 branch (128 in the paper and torchvision).
        bn_eps: BatchNorm epsilon (torchvision: PyTorch's default 1e-5).
        bn_momentum: BatchNorm momentum (torchvision: 0.1).
    """

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        num_classes: int,
        inter_channels: int = 128,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cbr = nn.Sequential(
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.BatchNorm2d(inter_channels, eps=bn_eps, momentum=bn_momentum),
            nn.ReLU(inplace=True),
        )
        self.scale = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def class_predictor(self) -> dict[str, int]:
        """The parameters whose rows are classes (one row each), for fine-tuning to another class count."""
        return {f"{conv}.{name}": 1 for conv in ("low_classifier", "high_classifier") for name in ("weight", "bias")}

    def output_layers(self) -> list[str]:
        """The two classifiers whose sum is the logits."""
        return ["low_classifier", "high_classifier"]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Class logits at the stride of ``features[0]`` from ``[stride-8, ..., stride-16]`` features."""
        low, high = features[0], features[-1]
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


@SEG_HEADS.register("lraspp")
def build_lraspp_head(cfg: Any, in_channels: list[int]) -> LRASPPHead:
    """The LR-ASPP head of a segmenter config on features of ``in_channels`` (finest first)."""
    if len(in_channels) < 2:
        raise ValueError(f"the lraspp head needs a stride-8 and a stride-16 feature; got widths {in_channels}")
    return LRASPPHead(
        in_channels[0], in_channels[-1], cfg.num_classes, inter_channels=cfg.head.channels or 128,
        bn_eps=cfg.bn_eps, bn_momentum=cfg.bn_momentum,
    )
