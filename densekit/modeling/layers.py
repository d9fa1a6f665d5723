"""Small building blocks shared by the BiFPN and the heads."""
from __future__ import annotations

import math

import torch
from timm.layers import create_pool2d
from torch import nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
}


def create_act(name: str) -> nn.Module:
    """Activation module by name (``swish``/``silu``, ``relu``, ``relu6``)."""
    try:
        return _ACTIVATIONS[name.lower()](inplace=True)
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


def create_norm(channels: int, eps: float = 1e-3, momentum: float = 0.01) -> nn.BatchNorm2d:
    """BatchNorm with the TF-ported defaults (eps 1e-3, PyTorch momentum 0.01 == TF decay 0.99)."""
    return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


class ConvNorm(nn.Sequential):
    """1x1 convolution followed by BatchNorm: the lateral projection where channel counts differ."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool, eps: float, momentum: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.bn = create_norm(out_channels, eps, momentum)


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 then pointwise 1x1 convolution, optionally followed by BatchNorm.

    For stride 1 and an odd kernel, TensorFlow 'SAME' padding is symmetric, so the TF-ported weights need no special
    padding here; only the stride-2 pooling between levels does (see :func:`create_downsample`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bias: bool = False,
        norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.conv_pw = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.bn = norm if norm is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv_pw(self.conv_dw(x)))


def create_downsample(tf_padding: bool) -> nn.Module:
    """3x3 stride-2 max-pool between adjacent pyramid levels.

    Args:
        tf_padding: Pad like TensorFlow 'SAME' (asymmetric, bottom/right first). The public TF-ported checkpoints
            were trained with it; a symmetric pad shifts every pooled window by one pixel.
    """
    return create_pool2d("max", kernel_size=3, stride=2, padding="same" if tf_padding else 1)


def glorot_uniform_(weight: torch.Tensor, groups: int = 1) -> None:
    """TF's glorot-uniform init with fan-out divided by the group count (depthwise convs)."""
    receptive = weight[0][0].numel()
    fan_in = weight.size(1) * receptive
    fan_out = weight.size(0) * receptive // groups
    limit = math.sqrt(3.0 / max(1.0, (fan_in + fan_out) / 2.0))
    nn.init.uniform_(weight, -limit, limit)


def variance_scaling_(weight: torch.Tensor) -> None:
    """TF's variance-scaling (fan-in, normal) init used for the class / box towers."""
    fan_in = weight.size(1) * weight[0][0].numel()
    nn.init.normal_(weight, std=math.sqrt(1.0 / max(1.0, fan_in)))
