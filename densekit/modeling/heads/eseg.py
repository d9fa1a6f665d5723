"""ESeg's segmentation head (Meng et al., "Revisiting Multi-Scale Feature Fusion for Semantic Segmentation", 2022).

Every BiFPN level (P3..P9) is upsampled to the finest one and the levels are summed with learned, fast-normalised
weights; a few separable conv + BN + act blocks and a 1x1 classifier follow. The whole context path lives in the
BiFPN, so the head stays at stride 8 and small; the meta-architecture upsamples the logits to the input.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import SeparableConv2d, create_act, create_norm
from ..registry import SEG_HEADS


class ESegHead(nn.Module):
    """Fuse all pyramid levels at the finest one, refine, classify.

    Args:
        in_channels: Width of the pyramid features (the BiFPN's ``channels``); all levels share it.
        num_levels: How many levels the head receives (7 for P3-P9).
        num_classes: Output classes.
        channels: Width of the refinement convs (default: ``in_channels``).
        repeats: Number of separable conv + BN + act blocks after the fusion.
        act: Activation name (``relu`` for ESeg-Lite, ``swish`` for ESeg).
        bn_eps: BatchNorm epsilon.
        bn_momentum: BatchNorm momentum.
    """

    def __init__(
        self,
        in_channels: int,
        num_levels: int,
        num_classes: int,
        channels: int | None = None,
        repeats: int = 2,
        act: str = "swish",
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        channels = channels or in_channels
        self.num_classes = num_classes
        self.fusion_weight = nn.Parameter(torch.ones(num_levels))
        blocks: list[nn.Module] = []
        for i in range(repeats):
            width_in = in_channels if i == 0 else channels
            norm = create_norm(channels, bn_eps, bn_momentum)
            blocks += [SeparableConv2d(width_in, channels, norm=norm), create_act(act)]
        self.convs = nn.Sequential(*blocks)
        self.classifier = nn.Conv2d(channels if repeats else in_channels, num_classes, 1)
        # Small logits at the start: every class begins near uniform, as in detectron2's semantic heads.
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def class_predictor(self) -> dict[str, int]:
        """The parameters whose rows are classes (one row each), for fine-tuning to another class count."""
        return {"classifier.weight": 1, "classifier.bias": 1}

    def output_layers(self) -> list[str]:
        """The classifier that writes the logits."""
        return ["classifier"]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Class logits at the finest level's resolution from the pyramid ``features`` (finest first)."""
        if len(features) != self.fusion_weight.numel():
            raise ValueError(f"ESegHead was built for {self.fusion_weight.numel()} levels, got {len(features)}")
        size = features[0].shape[-2:]
        w = F.relu(self.fusion_weight.to(features[0].dtype))
        w = w / (w.sum() + 1e-4)  # fast normalised fusion, as in the BiFPN nodes
        # Accumulate level by level so that only one upsampled map is alive at a time (P3 is 1/8 of 1024x2048).
        fused = w[0] * features[0]
        for wi, x in zip(w[1:], features[1:]):
            fused = fused + wi * F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.classifier(self.convs(fused))


@SEG_HEADS.register("eseg")
def build_eseg_head(cfg: Any, in_channels: list[int]) -> ESegHead:
    """The ESeg head of a segmenter config on pyramid features of ``in_channels`` (one width for all levels)."""
    if len(set(in_channels)) != 1:
        raise ValueError(f"the eseg head fuses levels of one width; got widths {in_channels} (add a neck)")
    return ESegHead(
        in_channels[0], len(in_channels), cfg.num_classes, cfg.head.channels, cfg.head.repeats, act=cfg.act,
        bn_eps=cfg.bn_eps, bn_momentum=cfg.bn_momentum,
    )
