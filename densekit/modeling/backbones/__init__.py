"""Backbones: timm models (EfficientNet family and anything with features_only) and torchvision MobileNetV3.

Use :func:`create_backbone`; the backbone family that knows the name (:data:`BACKBONE_FAMILIES`, see
:mod:`.family`) builds it, and it loads local weights in any layout it recognises (densekit, bare timm,
efficientnet_pytorch, torchvision classification checkpoints).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...checkpoint.io import read_state_dict
from ...config import IMAGENET_MEAN, IMAGENET_STD
from .base import Backbone, FeatureSpec, level_name
from .efficientnet_pytorch import convert_efficientnet_pytorch, is_efficientnet_pytorch_layout
from .family import BACKBONE_FAMILIES, BackboneFamily, BlockFolding, family_of, family_options, list_backbone_names

# Each family registers itself on import; the order here is the listing order: torchvision's two names before timm's.
from .torchvision_backbone import MobileNetV3Backbone
from .timm_backbone import TimmBackbone, named_weights_normalization, needs_image_size

__all__ = [
    "BACKBONE_FAMILIES",
    "Backbone",
    "BackboneFamily",
    "BlockFolding",
    "FeatureSpec",
    "MobileNetV3Backbone",
    "TimmBackbone",
    "build_backbone",
    "convert_efficientnet_pytorch",
    "create_backbone",
    "family_of",
    "is_efficientnet_pytorch_layout",
    "level_name",
    "list_backbones",
    "named_weights_normalization",
    "needs_image_size",
    "use_weights_normalization",
]

log = logging.getLogger(__name__)


def create_backbone(
    name: str,
    out_levels: Sequence[int] | None = None,
    weights: str | Path | None = None,
    pretrained: bool = False,
    image_size: Sequence[int] | int | None = None,
    **kwargs: Any,
) -> Backbone:
    """Build a backbone by name and optionally load weights.

    Args:
        name: ``"mobilenet_v3_large"`` / ``"mobilenet_v3_small"`` (torchvision) or any timm model name with
            features_only support (``"tf_efficientnet_b0"``, ``"tf_efficientnetv2_s"``, ``"resnet50"``...).
        out_levels: Pyramid levels to return (level L has stride ``2**L``). ``None`` means (3, 4, 5), or (3, 4)
            for a dilated MobileNetV3 whose output stride is 16.
        weights: Local checkpoint to load (all-or-nothing). Recognised layouts: densekit backbone state_dicts
            (``body.*`` / ``features.*``), bare timm state_dicts (head tensors ignored), efficientnet_pytorch
            (``_conv_stem``, ``_blocks.N``; converted), torchvision MobileNetV3 classification checkpoints.
        pretrained: Download the library's pretrained weights. Offline, this fails within seconds with a
            message suggesting ``weights=``. Mutually exclusive with ``weights``.
        image_size: ``(H, W)`` the backbone will run at. Only the backbones whose attention tables are sized at
            construction need it (CoAtNet / MaxViT, :func:`needs_image_size`; they then accept only that input
            size); all others run at any size and ignore it.
        **kwargs: The family's own options: MobileNetV3's ``dilated`` / ``reduced_tail`` / ``stage_start_levels``;
            for timm anything ``timm.create_model`` takes (e.g. ``drop_path_rate``).

    Raises:
        ValueError: unknown name (the message lists close matches), unavailable level, or both weights sources.
        CheckpointError: ``weights`` cannot be read or does not fit; the message names the file and keys.
        RuntimeError: ``pretrained=True`` but the weights cannot be downloaded.
    """
    if weights is not None and pretrained:
        raise ValueError("pass either weights=<file> or pretrained=True, not both")
    family = family_of(name)
    backbone = family.build(name, out_levels=out_levels, pretrained=pretrained, image_size=image_size, **kwargs)
    if weights is not None:
        backbone.load_weights(read_state_dict(weights), source=f"weights file {weights}")
    return backbone


def build_backbone(cfg: Any, image_size: Sequence[int] | None = None) -> Backbone:
    """The backbone a model config's ``backbone`` node describes (:class:`densekit.config.BackboneConfig`).

    Each option goes to the family that reads it (:attr:`BackboneFamily.options`: MobileNetV3's ``dilated``,
    ``reduced_tail``, ``stage_start_levels``; timm's ``drop_path_rate``); another family's option set on this
    backbone is refused rather than silently dropped. ``image_size`` is the model's ``image_size``, which the
    backbones that are built for one input size (CoAtNet) need; the others ignore it.
    """
    options = family_options(family_of(cfg.name), cfg)
    size = tuple(image_size) if image_size is not None else None
    return create_backbone(
        cfg.name, out_levels=tuple(cfg.out_levels), weights=cfg.weights, pretrained=cfg.pretrained, image_size=size,
        **options,
    )


def list_backbones(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Names :func:`create_backbone` accepts, family by family: torchvision's MobileNetV3s, then timm's models.

    Args:
        pattern: Shell-style filter (``"*efficientnet*"``).
        pretrained: Only timm models with pretrained weights (then timm names carry their tag, ``name.tag``).

    Not every timm model supports features_only; building one that does not raises a ValueError.
    """
    return list_backbone_names(pattern, pretrained)


def use_weights_normalization(cfg: Any) -> None:
    """Give a model config the input normalisation of the backbone weights its name selects, in place.

    Applies when ``cfg.backbone.name`` names timm weights explicitly (:func:`named_weights_normalization`, e.g.
    AdvProp's ``tf_efficientnet_b0.ap_in1k`` / ``tf_efficientnet_b0_ap``, trained on inputs in [-1, 1]) and the
    config still holds the schema's ImageNet ``pixel_mean`` / ``pixel_std``: those are then replaced by the weights'
    own (logged), and the resolved config (saved in checkpoints) records them. Any other normalisation in the
    config is the user's choice and is kept.
    """
    stats = named_weights_normalization(str(cfg.backbone.name))
    if stats is None or (list(cfg.pixel_mean), list(cfg.pixel_std)) != (IMAGENET_MEAN, IMAGENET_STD):
        return
    if stats != (IMAGENET_MEAN, IMAGENET_STD):
        log.info("backbone %s: pixel_mean %s, pixel_std %s (the weights' own normalisation)", cfg.backbone.name, *stats)
        cfg.pixel_mean, cfg.pixel_std = stats
