"""Anchor labelling for training: IoU ArgMax matching, batched over images and boxes (no Python loops)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_iou

from ..labels import CROWD_LABEL
from .box_coder import BoxCoder

NEGATIVE = -1


@dataclass
class AnchorTargets:
    """Per-anchor training targets for a batch.

    Attributes:
        labels: ``[B, N]`` class index of the matched box, ``NEGATIVE`` (-1) for background,
            :data:`~densekit.labels.CROWD_LABEL` (-2) for anchors on crowd regions, which contribute no loss.
        boxes: ``[B, N, 4]`` regression targets (zero where not positive).
        num_positives: ``[B]`` number of positive anchors per image.
    """

    labels: torch.Tensor
    boxes: torch.Tensor
    num_positives: torch.Tensor


class ArgMaxMatcher:
    """EfficientDet's matcher: an anchor is positive for the box it overlaps most if IoU >= ``iou_threshold``,
    negative otherwise; every box also claims its best anchor (``force_match``), so small boxes are never unmatched.
    When two boxes claim the same anchor, the first box wins, as in the reference.

    Args:
        box_coder: Encodes matched boxes into regression targets.
        iou_threshold: Positive IoU (0.5 in EfficientDet; no ignore band between positive and negative).
        force_match: Give each box its best-overlapping anchor regardless of IoU.
    """

    def __init__(self, box_coder: BoxCoder, iou_threshold: float = 0.5, force_match: bool = True) -> None:
        self.box_coder = box_coder
        self.iou_threshold = iou_threshold
        self.force_match = force_match

    def __call__(self, anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> AnchorTargets:
        """Label anchors.

        Args:
            anchors: ``[N, 4]`` xyxy.
            gt_boxes: ``[B, M, 4]`` xyxy in input pixels, padded.
            gt_labels: ``[B, M]`` class indices; -1 marks padding, ``CROWD_LABEL`` (-2) a crowd (ignore) region.
        """
        batch, num_gt = gt_labels.shape
        num_anchors = anchors.shape[0]
        device = anchors.device
        labels = torch.full((batch, num_anchors), NEGATIVE, dtype=torch.long, device=device)
        if num_gt == 0:
            zeros = torch.zeros(batch, num_anchors, 4, device=device)
            return AnchorTargets(labels, zeros, torch.zeros(batch, device=device))

        valid = gt_labels >= 0
        iou = box_iou(gt_boxes.reshape(-1, 4).to(anchors.dtype), anchors).view(batch, num_gt, num_anchors)
        iou_valid = iou.masked_fill(~valid[..., None], -1.0)
        best_iou, best_gt = iou_valid.max(1)  # [B, N]
        matched = best_iou >= self.iou_threshold

        if self.force_match:
            best_anchor = iou_valid.argmax(2)  # [B, M]
            claimant = torch.arange(num_gt, device=device).expand(batch, num_gt).masked_fill(~valid, num_gt)
            forced = torch.full((batch, num_anchors), num_gt, dtype=torch.long, device=device)
            forced.scatter_reduce_(1, best_anchor, claimant, reduce="amin")
            is_forced = forced < num_gt
            best_gt = torch.where(is_forced, forced, best_gt)
            matched |= is_forced

        labels = torch.where(matched, gt_labels.gather(1, best_gt), labels)
        # Branchless (no `if crowd.any()`): no host sync per step, and one graph under torch.compile. Without crowd
        # boxes crowd_iou is -1 everywhere and nothing changes.
        crowd = gt_labels == CROWD_LABEL
        crowd_iou = iou.masked_fill(~crowd[..., None], -1.0).amax(1)
        labels = labels.masked_fill(~matched & (crowd_iou >= self.iou_threshold), CROWD_LABEL)

        matched_boxes = gt_boxes.gather(1, best_gt[..., None].expand(-1, -1, 4)).to(anchors.dtype)
        box_targets = self.box_coder.encode(matched_boxes, anchors.expand(batch, -1, -1))
        box_targets = box_targets * matched[..., None]
        return AnchorTargets(labels, box_targets, matched.sum(1).to(anchors.dtype))
