"""Building models from ``conf/model`` entries: the Python twin of what Hydra composes for the tools."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..checkpoint.convert import load_weights
from ..config import resolve_model_config
from .anchors import AnchorGenerator
from .backbones import Backbone, create_backbone
from .backbones.torchvision_backbone import TORCHVISION_BACKBONES
from .box_coder import BoxCoder
from .detector import EfficientDet
from .heads.efficientdet import EfficientDetHead
from .heads.eseg import ESegHead
from .heads.lraspp import LRASPPHead
from .losses import DetectionLoss
from .matcher import ArgMaxMatcher
from .necks.bifpn import BiFPN
from .postprocess import DetectionPostprocessor
from .segmenter import SegmentationLoss, Segmenter


def config_dir() -> Path:
    """The ``conf/`` tree: ``$DENSEKIT_CONF`` or the one beside the package (editable install / source checkout)."""
    path = Path(os.environ.get("DENSEKIT_CONF", Path(__file__).resolve().parents[2] / "conf"))
    if not (path / "model").is_dir():
        raise FileNotFoundError(f"densekit config tree not found at {path}; set DENSEKIT_CONF to the repo's conf/ directory")
    return path


def list_models(arch: str | None = None) -> list[str]:
    """Names accepted by :func:`create_model` (the files in ``conf/model``).

    Args:
        arch: Only models of this architecture (``"efficientdet"``, ``"segmenter"``); ``None`` lists all.
    """
    model_dir = config_dir() / "model"
    names = sorted(p.stem for p in model_dir.glob("*.yaml") if not p.stem.startswith("_"))
    if arch is None:
        return names
    # A model's arch is in its YAML (the schema's default is efficientdet); reading the files costs milliseconds.
    return [n for n in names if OmegaConf.load(model_dir / f"{n}.yaml").get("arch", "efficientdet") == arch]


def load_model_config(name: str, **overrides: Any) -> DictConfig:
    """The resolved config of ``conf/model/<name>.yaml`` with ``overrides`` (nested dicts) merged on top."""
    path = config_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)  # Hydra's pointer to the schema, which resolve_model_config applies itself
    cfg = OmegaConf.merge(raw, OmegaConf.create(overrides))
    return resolve_model_config(cfg, source=str(path))


def build_bifpn(cfg: DictConfig, backbone: Backbone) -> BiFPN:
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


def build_efficientdet(cfg: DictConfig) -> EfficientDet:
    """Assemble an :class:`EfficientDet` from a resolved config (see :class:`densekit.config.EfficientDetConfig`)."""
    norm = dict(redundant_bias=cfg.redundant_bias, bn_eps=cfg.bn_eps, bn_momentum=cfg.bn_momentum)
    backbone = create_backbone(
        cfg.backbone.name,
        out_levels=tuple(cfg.backbone.out_levels),
        weights=cfg.backbone.weights,
        pretrained=cfg.backbone.pretrained,
        drop_path_rate=cfg.backbone.drop_path_rate,
    )
    neck = build_bifpn(cfg, backbone)
    anchors = AnchorGenerator(
        cfg.neck.min_level, cfg.neck.max_level, cfg.anchors.num_scales, cfg.anchors.aspect_ratios, cfg.anchors.anchor_scale
    )
    head = EfficientDetHead(
        cfg.neck.channels,
        cfg.num_classes,
        anchors.num_anchors,
        num_levels=cfg.neck.max_level - cfg.neck.min_level + 1,
        repeats=cfg.head.repeats,
        act=cfg.act,
        **norm,
    )
    coder = BoxCoder()
    post = cfg.postprocess
    return EfficientDet(
        backbone,
        neck,
        head,
        anchors,
        ArgMaxMatcher(coder, cfg.loss.match_iou),
        DetectionLoss(cfg.loss.alpha, cfg.loss.gamma, cfg.loss.huber_delta, cfg.loss.box_loss_weight),
        DetectionPostprocessor(
            coder, post.pre_nms_top_k, post.nms_iou, post.max_detections, post.score_threshold, post.soft_nms, post.soft_nms_sigma
        ),
        cfg.pixel_mean,
        cfg.pixel_std,
    )


SEG_HEADS = ("eseg", "lraspp")


def _segmentation_backbone(cfg: DictConfig) -> Backbone:
    """The backbone of a segmenter config: MobileNetV3 options go to torchvision, ``drop_path_rate`` to timm."""
    b = cfg.backbone
    common = dict(out_levels=tuple(b.out_levels), weights=b.weights, pretrained=b.pretrained)
    if b.name in TORCHVISION_BACKBONES:
        return create_backbone(
            b.name, dilated=b.dilated, reduced_tail=b.reduced_tail, stage_start_levels=tuple(b.stage_start_levels), **common
        )
    used = [k for k in ("dilated", "reduced_tail", "stage_start_levels") if b[k]]
    if used:
        options = ', '.join(TORCHVISION_BACKBONES)
        raise ValueError(f"backbone.{used[0]} is a MobileNetV3 option ({options}), not for {b.name!r}")
    return create_backbone(b.name, drop_path_rate=b.drop_path_rate, **common)


def build_segmenter(cfg: DictConfig) -> Segmenter:
    """Assemble a :class:`Segmenter` from a resolved config (see :class:`densekit.config.SegmenterConfig`)."""
    norm = dict(bn_eps=cfg.bn_eps, bn_momentum=cfg.bn_momentum)
    if cfg.head.type not in SEG_HEADS:
        raise ValueError(f"unknown segmentation head type {cfg.head.type!r}; choose one of {', '.join(SEG_HEADS)}")
    backbone = _segmentation_backbone(cfg)
    neck = None
    channels = backbone.out_channels
    if cfg.neck is not None:
        neck = build_bifpn(cfg, backbone)
        channels = [cfg.neck.channels] * (cfg.neck.max_level - cfg.neck.min_level + 1)
    head: nn.Module
    if cfg.head.type == "lraspp":
        if len(channels) < 2:
            raise ValueError(f"the lraspp head needs a stride-8 and a stride-16 feature; got {backbone.feature_specs}")
        head = LRASPPHead(channels[0], channels[-1], cfg.num_classes, inter_channels=cfg.head.channels or 128, **norm)
    else:
        if len(set(channels)) != 1:
            raise ValueError(f"the eseg head fuses levels of one width; got widths {channels} (add a neck)")
        head = ESegHead(
            channels[0], len(channels), cfg.num_classes, cfg.head.channels, cfg.head.repeats, act=cfg.act, **norm
        )
    loss = SegmentationLoss(cfg.ignore_index, cfg.loss.ohem, cfg.loss.ohem_thresh, cfg.loss.ohem_min_kept)
    return Segmenter(backbone, neck, head, loss, cfg.pixel_mean, cfg.pixel_std)


_BUILDERS = {"efficientdet": build_efficientdet, "segmenter": build_segmenter}


def build_model(cfg: Any) -> nn.Module:
    """Build a model from a (possibly partial) model config, e.g. Hydra's ``cfg.model``."""
    cfg = resolve_model_config(cfg)
    model = _BUILDERS[cfg.arch](cfg)
    model.config = cfg
    return model


def create_model(name: str, num_classes: int | None = None, weights: str | os.PathLike | None = None, **overrides: Any) -> nn.Module:
    """Build any ``conf/model`` entry by name.

    Args:
        name: Model name, e.g. ``"efficientdet_d0"``; :func:`list_models` lists them.
        num_classes: Replace the config's class count (the head is re-initialised).
        weights: A checkpoint to load: densekit's own, an efficientdet-pytorch or a torchvision LR-ASPP state_dict,
            or (for the backbone alone, via ``backbone={"weights": ...}``) EfficientNet / MobileNetV3 weights.
        **overrides: Config overrides as nested dicts, e.g. ``neck={"repeats": 1}``, ``image_size=[256, 256]``.
    """
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    model = build_model(load_model_config(name, **overrides))
    if weights is not None:
        load_weights(model, weights)
    return model
