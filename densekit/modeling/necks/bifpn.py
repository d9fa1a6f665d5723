"""BiFPN (Tan et al., EfficientDet, 2020): one implementation for every pyramid range.

P3-P7 (EfficientDet), P3-P8 (D7x), P3-P9 (ESeg) and P2-based ranges differ only in ``min_level`` /
``max_level``: the topology (top-down then bottom-up, with skip edges from the layer input) is generated from the
level range, and the levels the backbone lacks are made from its top feature by a 1x1 conv + BN (where channels
differ) and stride-2 max-pooling.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from ..grad_checkpoint import checkpointed
from ..registry import NECKS
from ..layers import ConvNorm, SeparableConv2d, create_act, create_downsample, create_norm, glorot_uniform_

FUSIONS = ("fast", "softmax", "sum")


@dataclass(frozen=True)
class FusionNodeSpec:
    """One output of a BiFPN layer: the level it lives on and the layer-local feature indices it fuses.

    Indices count the layer's inputs first (0 .. num_levels-1, finest first), then the nodes in creation order.
    """

    level: int
    inputs: tuple[int, ...]


def bifpn_topology(min_level: int, max_level: int) -> list[FusionNodeSpec]:
    """Node list of one BiFPN layer over ``min_level .. max_level``.

    Top-down: every level but the top fuses its input with the upsampled node above. Bottom-up: every level but
    the bottom fuses its layer input, its top-down node (when it has one) and the downsampled node below.
    """
    latest = {level: [i] for i, level in enumerate(range(min_level, max_level + 1))}
    nodes: list[FusionNodeSpec] = []

    def add(level: int, inputs: list[int]) -> None:
        nodes.append(FusionNodeSpec(level, tuple(inputs)))
        latest[level].append(max_level - min_level + len(nodes))

    for level in range(max_level - 1, min_level - 1, -1):
        add(level, [latest[level][-1], latest[level + 1][-1]])
    for level in range(min_level + 1, max_level + 1):
        add(level, latest[level] + [latest[level - 1][-1]])
    return nodes


class FusionNode(nn.Module):
    """Resize the inputs to this node's level, fuse them with learned weights, then act + separable conv + BN.

    Resizing is parameter-free and follows the shapes: nearest upsampling to the target size, or a 3x3 stride-2
    max-pool; only inputs whose channel count differs (backbone features in the first layer) get a 1x1 lateral.
    """

    def __init__(
        self,
        in_channels: list[int],
        inputs: tuple[int, ...],
        channels: int,
        fusion: str,
        act: str,
        tf_padding: bool,
        redundant_bias: bool,
        bn_eps: float,
        bn_momentum: float,
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown BiFPN fusion {fusion!r}; choose one of {FUSIONS}")
        self.inputs = inputs
        self.fusion = fusion
        # TF-ported weights carry a bias before every BN; the native variants drop it.
        self.lateral = nn.ModuleDict(
            {
                str(i): ConvNorm(in_channels[i], channels, redundant_bias, bn_eps, bn_momentum)
                for i in inputs
                if in_channels[i] != channels
            }
        )
        self.fusion_weight = nn.Parameter(torch.ones(len(inputs))) if fusion != "sum" else None
        self.downsample = create_downsample(tf_padding)
        self.act = create_act(act)
        self.conv = SeparableConv2d(channels, channels, bias=redundant_bias, norm=create_norm(channels, bn_eps, bn_momentum))

    def _resize(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        if x.shape[-2:] == size:
            return x
        if x.shape[-2] > size[0]:
            return self.downsample(x)
        return F.interpolate(x, size=size, mode="nearest")

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        # The node lives on its first input's level: the layer input or top-down node of the same level.
        size = features[self.inputs[0]].shape[-2:]
        resized = []
        for i in self.inputs:
            x = features[i]
            lateral = self.lateral[str(i)] if str(i) in self.lateral else None
            resized.append(self._resize(lateral(x) if lateral is not None else x, size))
        if self.fusion_weight is None:
            fused = torch.stack(resized).sum(0)
        else:
            w = self.fusion_weight.to(resized[0].dtype)
            # "fast normalized fusion": relu(w) / (sum relu(w) + eps) costs far less than a softmax on TPUs/GPUs.
            w = F.relu(w) / (F.relu(w).sum() + 1e-4) if self.fusion == "fast" else torch.softmax(w, 0)
            fused = sum(wi * xi for wi, xi in zip(w, resized))
        return self.conv(self.act(fused))


class BiFPNLayer(nn.Module):
    """One repeat of the BiFPN: ``num_levels`` features in, ``num_levels`` fused features out."""

    def __init__(self, in_channels: list[int], min_level: int, max_level: int, channels: int, **node_kwargs) -> None:
        super().__init__()
        topology = bifpn_topology(min_level, max_level)
        all_channels = list(in_channels) + [channels] * len(topology)
        self.num_levels = max_level - min_level + 1
        self.nodes = nn.ModuleList(FusionNode(all_channels, spec.inputs, channels, **node_kwargs) for spec in topology)
        # The last node written on each level is that level's output.
        last = {spec.level: self.num_levels + i for i, spec in enumerate(topology)}
        self.output_ids = [last.get(level, idx) for idx, level in enumerate(range(min_level, max_level + 1))]

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        features = list(features)
        for node in self.nodes:
            features.append(node(features))
        return [features[i] for i in self.output_ids]


class ExtraLevel(nn.Module):
    """A coarser level made from the one below: 1x1 conv + BN where channels differ, then stride-2 max-pool."""

    def __init__(self, in_channels: int, channels: int, tf_padding: bool, redundant_bias: bool, bn_eps: float, bn_momentum: float) -> None:
        super().__init__()
        self.lateral = ConvNorm(in_channels, channels, redundant_bias, bn_eps, bn_momentum) if in_channels != channels else None
        self.pool = create_downsample(tf_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.lateral(x) if self.lateral is not None else x)


class BiFPN(nn.Module):
    """Bidirectional feature pyramid over ``min_level .. max_level``.

    Args:
        in_channels: Channels of the backbone features, finest first, one per level from ``min_level`` up.
        min_level: Finest output level (3 -> stride 8).
        max_level: Coarsest output level; levels above the backbone's are created by :class:`ExtraLevel`.
        channels: Width of every BiFPN feature.
        repeats: Number of stacked BiFPN layers.
        fusion: ``"fast"`` (fast normalized fusion), ``"softmax"`` or ``"sum"``.
        act: Activation applied before every separable conv.
        tf_padding: TF 'SAME' max-pool padding (needed by the TF-ported checkpoints).
        redundant_bias: Conv bias before BN, as in the TF-ported checkpoints.
        bn_eps: BatchNorm epsilon.
        bn_momentum: BatchNorm momentum (PyTorch convention).
    """

    def __init__(
        self,
        in_channels: list[int],
        min_level: int = 3,
        max_level: int = 7,
        channels: int = 64,
        repeats: int = 3,
        fusion: str = "fast",
        act: str = "swish",
        tf_padding: bool = True,
        redundant_bias: bool = True,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        num_levels = max_level - min_level + 1
        if not 0 < len(in_channels) <= num_levels:
            raise ValueError(
                f"BiFPN over P{min_level}-P{max_level} takes 1 to {num_levels} backbone features, got {len(in_channels)}"
            )
        self.min_level, self.max_level, self.channels = min_level, max_level, channels
        norm = dict(redundant_bias=redundant_bias, bn_eps=bn_eps, bn_momentum=bn_momentum)
        level_channels = list(in_channels)
        self.extra_levels = nn.ModuleList()
        while len(level_channels) < num_levels:
            self.extra_levels.append(ExtraLevel(level_channels[-1], channels, tf_padding, **norm))
            level_channels.append(channels)
        self.layers = nn.ModuleList()
        for _ in range(repeats):
            self.layers.append(
                BiFPNLayer(level_channels, min_level, max_level, channels, fusion=fusion, act=act, tf_padding=tf_padding, **norm)
            )
            level_channels = [channels] * num_levels
        self.grad_checkpointing = False  # model.grad_checkpoint: recompute each BiFPN layer in the backward pass
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                glorot_uniform_(m.weight, groups=m.groups)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def out_strides(self) -> list[int]:
        return [2**level for level in range(self.min_level, self.max_level + 1)]

    @property
    def out_channels(self) -> list[int]:
        return [self.channels] * (self.max_level - self.min_level + 1)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Fuse backbone features (finest first) into ``max_level - min_level + 1`` maps of ``channels``."""
        features = list(features)
        for extra in self.extra_levels:
            features.append(extra(features[-1]))
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            features = checkpointed(layer, features) if recompute else layer(features)
        return features


@NECKS.register("bifpn")
def build_bifpn(cfg: Any, backbone: Backbone) -> BiFPN:
    """The BiFPN of a detector or segmenter config (``cfg.neck`` plus the model-wide act / padding / BN keys)."""
    lowest = min(s.level for s in backbone.feature_specs)
    if lowest != cfg.neck.min_level:
        raise ValueError(f"backbone.out_levels starts at {lowest} but neck.min_level is {cfg.neck.min_level}")
    return BiFPN(
        backbone.out_channels,
        min_level=cfg.neck.min_level,
        max_level=cfg.neck.max_level,
        channels=cfg.neck.channels,
        repeats=cfg.neck.repeats,
        fusion=cfg.neck.fusion,
        act=cfg.act,
        tf_padding=cfg.tf_padding,
        redundant_bias=cfg.redundant_bias,
        bn_eps=cfg.bn_eps,
        bn_momentum=cfg.bn_momentum,
    )
