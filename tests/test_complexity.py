"""densekit.utils.complexity: parameter and multiply-add counting."""
from __future__ import annotations

import torch
from torch import nn

from densekit.utils import count_macs, count_parameters, format_count, to_meta


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8))


def test_count_parameters() -> None:
    net = small_net()
    net[0].weight.requires_grad_(False)
    assert count_parameters(net) == (8 * 27 + 8) + 16 + (8 * 9 + 8)
    assert count_parameters(net, trainable_only=True) == 8 + 16 + (8 * 9 + 8)


def test_count_macs_counts_convolutions_per_output_element() -> None:
    net = small_net().train()
    # conv 3->8 3x3 at 16x16, then a depthwise 3x3 at 14x14; BN / ReLU are not multiply-adds of a layer.
    expected = 8 * 27 * 16 * 16 + 8 * 9 * 14 * 14
    assert count_macs(net, (16, 16)) == expected
    assert count_macs(net, (16, 16), batch=3) == 3 * expected
    assert net.training and net[0].weight.device.type == "cpu"  # the model itself is left as it was


def test_to_meta_copies_shapes_not_data() -> None:
    net = small_net()
    meta = to_meta(net)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert all(b.device.type == "meta" for b in meta.buffers())
    assert [p.shape for p in meta.parameters()] == [p.shape for p in net.parameters()]
    assert all(p.device.type == "cpu" for p in net.parameters())


class DataDependent(nn.Module):
    """A module that reads a value back to Python, which the meta device cannot do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.abs().sum().item() >= 0 else -y


def test_count_macs_falls_back_to_a_real_run() -> None:
    assert count_macs(DataDependent(), (5, 5)) == 4 * 3 * 25


def test_format_count() -> None:
    assert format_count(3_880_067) == "3.88M"
    assert format_count(2.49e9) == "2.49B"
    assert format_count(512) == "512"
