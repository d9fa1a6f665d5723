"""EfficientDet meta-architecture: backbone -> BiFPN -> class/box head, with anchors, loss and post-processing."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..config import EfficientDetConfig
from ..labels import CROWD_LABEL
from .anchors import AnchorGenerator
from .backbones import Backbone, build_backbone
from .base import DenseModel, Images, compile_target
from .box_coder import BoxCoder
from .heads.efficientdet import EfficientDetHead
from .losses import DetectionLoss
from .matcher import ArgMaxMatcher
from .necks.bifpn import BiFPN
from .postprocess import DetectionPostprocessor, flatten_levels, level_views
from . import necks  # noqa: F401  (registers the necks)
from .registry import META_ARCHS, NECKS, MetaArch


class EfficientDet(DenseModel):
    """A one-stage detector with torchvision's calling convention.

    * ``model.train(); model(images, targets)`` -> ``{"loss_cls", "loss_box"}`` (sum them for the total).
    * ``model.eval(); model(images)`` -> one ``{"boxes", "scores", "labels"}`` dict per image, boxes ``(x1, y1, x2,
      y2)`` in input pixels, labels 0-based class indices (for a 90-class COCO head, COCO id = label + 1).
    * ``model.forward_raw(images)`` -> per-level class logits ``[B, A*C, H, W]`` and box regressions
      ``[B, A*4, H, W]``.

    ``images`` follow :class:`~densekit.modeling.base.DenseModel`'s convention; padding (bottom/right) leaves box
    coordinates unchanged, and boxes are clipped to each unpadded image.
    """

    def __init__(
        self,
        backbone: Backbone,
        neck: BiFPN,
        head: EfficientDetHead,
        anchor_generator: AnchorGenerator,
        matcher: ArgMaxMatcher,
        loss: DetectionLoss,
        postprocessor: DetectionPostprocessor,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        config: Any = None,
    ) -> None:
        super().__init__(backbone, neck, head, pixel_mean, pixel_std, config)
        self.anchor_generator = anchor_generator
        self.matcher = matcher
        self.loss = loss
        self.postprocessor = postprocessor

    @compile_target
    def network(self, batch: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A stacked, unnormalised batch -> per-level head outputs: normalise, pad, backbone, BiFPN, head."""
        features = list(self.backbone(self.normalize_and_pad(batch)).values())
        return self.head(self.neck(features))

    def forward_raw(self, images: Images) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-level class logits and box regressions (see the class docstring)."""
        return self.network(self.stack_images(images)[0])

    def forward(self, images: Images, targets: list[dict[str, torch.Tensor]] | None = None):
        batch, sizes = self.stack_images(images)
        if self.training:  # check targets before spending a forward pass on them
            if targets is None:
                raise ValueError("in training mode the model needs targets: a list of {'boxes', 'labels'} per image")
            gt_boxes, gt_labels = self._pad_targets(targets, batch.shape[0], batch.device)
        cls_out, box_out = self.training_fn("network")(batch)
        anchors = self.anchor_generator(self.padded_size(batch.shape[-2:]), batch.device)
        if self.training:
            return self.training_fn("training_losses")(cls_out, box_out, anchors, gt_boxes, gt_labels)
        # Per-level class logits: top-k reads them in place instead of concatenating all N x C of them.
        return self.postprocessor(level_views(cls_out, self.num_classes), flatten_levels(box_out, 4), anchors, sizes)

    training_compile_targets = ("network", "training_losses")

    def training_losses(
        self, cls_out: list[torch.Tensor], box_out: list[torch.Tensor], anchors: torch.Tensor,
        gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per-level head outputs and padded targets (``[B, M, 4]`` xyxy, ``[B, M]`` labels, -1 padding) -> losses:
        anchor matching and the focal / Huber losses, pure tensor work (compiled by ``train.compile``)."""
        targets = self.matcher(anchors, gt_boxes, gt_labels)
        return self.loss(flatten_levels(cls_out, self.num_classes), flatten_levels(box_out, 4), targets)

    def _pad_targets(self, targets: list[dict[str, torch.Tensor]], batch: int, device: torch.device):
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for {batch} images")
        most = max((len(t["labels"]) for t in targets), default=0)
        boxes = torch.zeros(batch, most, 4, device=device)
        labels = torch.full((batch, most), -1, dtype=torch.long, device=device)
        for i, t in enumerate(targets):
            n = len(t["labels"])
            if t["boxes"].shape != (n, 4):
                raise ValueError(f"target {i}: boxes must be [{n}, 4] xyxy, got {list(t['boxes'].shape)}")
            lab = t["labels"].to(device=device, dtype=torch.long)
            bad = (lab >= self.num_classes) | (lab < CROWD_LABEL)
            if bad.any():
                raise ValueError(
                    f"target {i}: label {int(lab[bad][0])} out of range for a {self.num_classes}-class model "
                    f"(labels are 0-based class indices; {CROWD_LABEL} marks a crowd region)"
                )
            boxes[i, :n] = t["boxes"].to(device)
            labels[i, :n] = lab
        return boxes, labels


def build_efficientdet(cfg: Any) -> EfficientDet:
    """Assemble an :class:`EfficientDet` from a resolved config (see :class:`densekit.config.EfficientDetConfig`)."""
    backbone = build_backbone(cfg.backbone, image_size=cfg.image_size)
    neck = NECKS.get(cfg.neck.type)(cfg, backbone)
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
        redundant_bias=cfg.redundant_bias,
        bn_eps=cfg.bn_eps,
        bn_momentum=cfg.bn_momentum,
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
        config=cfg,
    )


META_ARCHS.register("efficientdet")(MetaArch(EfficientDetConfig, build_efficientdet))
