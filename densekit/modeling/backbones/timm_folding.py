"""How timm's blocks fold their BatchNorms: the timm family's fold rules (:class:`~.family.BlockFolding`).

Each entry lists the ``(conv, bn)`` attribute pairs that the block's ``forward`` runs back to back (timm 1.0).
Classes are keyed by module and name: a rule read off one class's ``forward`` must not fold another class that
happens to share its name (timm has several ``Stem``\\ s). A block missing here keeps its BatchNorms, and
:func:`densekit.deploy.optimize.fold_batchnorm` says so (or raises with ``strict=True``); a timm release that moves
a class shows up the same way, and in ``tests/deploy/test_fold_all_backbones.py``.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .family import BlockFolding

_EFFNET_STEM = BlockFolding(pairs=(("conv_stem", "bn1"), ("conv_head", "bn2")))  # conv_head: whole models only
_S2D = (("conv_s2d", "bn_s2d"),)  # space-to-depth stem of some blocks, run before the rest when present

_PRE_NORM = "a BN on the block input, which no conv precedes (it runs before the 1x1 conv; the shortcut skips it)"
_SE_BETWEEN = "the squeeze-excitation (se_early) runs between conv2_kxk and this BN"


def _maxxvit_mbconv(block: nn.Module) -> BlockFolding:
    """CoAtNet / MaxViT's MBConv: ``pre_norm -> down -> conv1_1x1 -> norm1 -> conv2_kxk [-> se_early] -> norm2``."""
    se_between = getattr(block, "se_early", None) is not None
    pairs = (("conv1_1x1", "norm1"),) + (() if se_between else (("conv2_kxk", "norm2"),))
    kept = (("pre_norm", _PRE_NORM),) + ((("norm2", _SE_BETWEEN),) if se_between else ())
    return BlockFolding(pairs=pairs, kept=kept)


#: ``"module.Class"`` -> the block's folding, or a function of the block for blocks whose layout varies.
TIMM_BLOCKS: dict[str, BlockFolding | Callable[[nn.Module], BlockFolding]] = {
    "timm.models.efficientnet.EfficientNet": _EFFNET_STEM,
    "timm.models.efficientnet.EfficientNetFeatures": _EFFNET_STEM,
    "timm.models.mobilenetv3.MobileNetV3": _EFFNET_STEM,
    "timm.models.mobilenetv3.MobileNetV3Features": _EFFNET_STEM,
    "timm.models._efficientnet_blocks.ConvBnAct": BlockFolding(pairs=(("conv", "bn1"),)),
    "timm.models._efficientnet_blocks.DepthwiseSeparableConv": BlockFolding(
        pairs=_S2D + (("conv_dw", "bn1"), ("conv_pw", "bn2"))
    ),
    "timm.models._efficientnet_blocks.InvertedResidual": BlockFolding(
        pairs=_S2D + (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))
    ),
    "timm.models._efficientnet_blocks.EdgeResidual": BlockFolding(pairs=(("conv_exp", "bn1"), ("conv_pwl", "bn2"))),
    "timm.models.maxxvit.Stem": BlockFolding(pairs=(("conv1", "norm1"),)),  # conv1 -> norm1 -> conv2
    "timm.models.maxxvit.MbConvBlock": _maxxvit_mbconv,
}


def timm_fold_rules(module: nn.Module) -> BlockFolding | None:
    """The folding of a timm block (:data:`TIMM_BLOCKS`), None for any other module."""
    cls = type(module)
    rule = TIMM_BLOCKS.get(f"{cls.__module__}.{cls.__qualname__}")
    return rule(module) if callable(rule) else rule
