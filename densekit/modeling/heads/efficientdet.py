"""EfficientDet class and box networks.

Each is a tower of separable convs whose weights are shared across pyramid levels while every level keeps its own
BatchNorm (feature statistics differ by scale), followed by a separable prediction conv.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import SeparableConv2d, create_act, create_norm, variance_scaling_


class SharedConvTower(nn.Module):
    """``repeats`` x (separable conv -> per-level BN -> act), then a separable conv predicting ``num_outputs``.

    Args:
        channels: Input (BiFPN) width, kept through the tower.
        num_outputs: Output channels per location (anchors x classes, or anchors x 4).
        num_levels: Number of pyramid levels sharing the convs.
        repeats: Tower depth.
        act: Activation name.
        redundant_bias: Bias in the tower convs (present in the TF-ported checkpoints).
        bn_eps: BatchNorm epsilon.
        bn_momentum: BatchNorm momentum.
        prior_prob: If set, the prediction bias starts at logit(prior_prob) (focal-loss init for class logits).
    """

    def __init__(
        self,
        channels: int,
        num_outputs: int,
        num_levels: int,
        repeats: int,
        act: str = "swish",
        redundant_bias: bool = True,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        prior_prob: float | None = None,
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(SeparableConv2d(channels, channels, bias=redundant_bias) for _ in range(repeats))
        # norms[level][repeat]: level-major, so the forward loop indexes plainly (TorchScript/compile friendly).
        self.norms = nn.ModuleList(
            nn.ModuleList(create_norm(channels, bn_eps, bn_momentum) for _ in range(repeats)) for _ in range(num_levels)
        )
        self.act = create_act(act)
        self.predict = SeparableConv2d(channels, num_outputs, bias=True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                variance_scaling_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if prior_prob is not None:
            # Start every anchor at p = prior_prob so the focal loss is not swamped by easy negatives at step 0.
            nn.init.constant_(self.predict.conv_pw.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for x, norms in zip(features, self.norms):
            for conv, norm in zip(self.convs, norms):
                x = self.act(norm(conv(x)))
            outputs.append(self.predict(x))
        return outputs


class EfficientDetHead(nn.Module):
    """Class net and box net over all levels.

    Outputs per level: class logits ``[B, A*C, H, W]`` and box regressions ``[B, A*4, H, W]`` where channel
    ``a*C + c`` is anchor ``a``, class ``c``, and box channels are ``(dy, dx, dh, dw)`` per anchor (TF order).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        num_anchors: int,
        num_levels: int,
        repeats: int,
        act: str = "swish",
        redundant_bias: bool = True,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        common = dict(
            channels=channels, num_levels=num_levels, repeats=repeats, act=act,
            redundant_bias=redundant_bias, bn_eps=bn_eps, bn_momentum=bn_momentum,
        )
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.class_net = SharedConvTower(num_outputs=num_anchors * num_classes, prior_prob=prior_prob, **common)
        self.box_net = SharedConvTower(num_outputs=num_anchors * 4, **common)

    def class_predictor(self) -> dict[str, int]:
        """The parameters whose rows are classes (the class net's last conv), each with its rows per class:
        channel ``a*C + c`` is anchor ``a``, class ``c`` (``num_anchors`` rows per class). See fine-tuning in
        :mod:`densekit.checkpoint.finetune`."""
        return {f"class_net.predict.conv_pw.{name}": self.num_anchors for name in ("weight", "bias")}

    def output_layers(self) -> list[str]:
        """The class and box nets' last pointwise convs (what writes logits and box deltas)."""
        return ["class_net.predict.conv_pw", "box_net.predict.conv_pw"]

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.class_net(features), self.box_net(features)
