"""The backbone interface every detector and segmenter builds on.

A backbone maps an image batch to named multi-scale features. Like detectron2's ``Backbone.output_shape()``, it
also describes those features (name, stride, channels) before any forward pass, so that necks and heads can be
built from the description alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FeatureSpec:
    """Describes one feature map a backbone returns.

    Attributes:
        name: Key of the feature in the backbone's output dict, ``"c{level}"`` (``"c3"`` is stride 8).
        stride: Down-sampling factor relative to the input image.
        channels: Number of channels.
    """

    name: str
    stride: int
    channels: int

    @property
    def level(self) -> int:
        """Pyramid level, log2 of the stride (stride 8 -> level 3)."""
        return self.stride.bit_length() - 1


class Backbone(nn.Module):
    """Base class: subclasses set ``self.feature_specs`` and return ``{spec.name: tensor}`` in that order."""

    feature_specs: list[FeatureSpec]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def out_channels(self) -> list[int]:
        return [s.channels for s in self.feature_specs]

    @property
    def strides(self) -> list[int]:
        return [s.stride for s in self.feature_specs]


def level_name(level: int) -> str:
    """Name of a backbone feature at a pyramid level (``3 -> "c3"``)."""
    return f"c{level}"
