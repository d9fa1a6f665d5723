"""Detection losses: sigmoid focal loss (torchvision) for classes, Huber loss for boxes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from ..labels import CROWD_LABEL
from .matcher import AnchorTargets


class DetectionLoss(nn.Module):
    """EfficientDet's training loss.

    Both terms are normalised by the number of positive anchors in the batch (+1, so a batch without boxes stays
    finite). The box term uses ``num_positives * 4`` and is multiplied by ``box_loss_weight``.

    Args:
        alpha: Focal loss positive weight.
        gamma: Focal loss focusing exponent.
        huber_delta: Huber transition point for box regressions.
        box_loss_weight: Weight of the box term in the total.
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 1.5, huber_delta: float = 0.1, box_loss_weight: float = 50.0) -> None:
        super().__init__()
        self.alpha, self.gamma = alpha, gamma
        self.huber_delta = huber_delta
        self.box_loss_weight = box_loss_weight

    def forward(self, cls_logits: torch.Tensor, box_deltas: torch.Tensor, targets: AnchorTargets) -> dict[str, torch.Tensor]:
        """Losses from flattened outputs ``[B, N, C]`` / ``[B, N, 4]``.

        Returns:
            ``{"loss_cls": ..., "loss_box": ...}``; ``loss_box`` already carries ``box_loss_weight``, so the total
            training loss is the sum of the values (torchvision's convention).
        """
        num_classes = cls_logits.shape[-1]
        normalizer = targets.num_positives.sum() + 1.0
        positive = targets.labels >= 0
        one_hot = F.one_hot(targets.labels.clamp(min=0), num_classes).to(cls_logits.dtype) * positive[..., None]
        focal = sigmoid_focal_loss(cls_logits.float(), one_hot.float(), alpha=self.alpha, gamma=self.gamma, reduction="none")
        cls_loss = (focal.sum(-1) * (targets.labels != CROWD_LABEL)).sum() / normalizer

        huber = F.huber_loss(box_deltas.float(), targets.boxes.float(), delta=self.huber_delta, reduction="none")
        box_loss = (huber.sum(-1) * positive).sum() / (normalizer * 4.0)
        return {"loss_cls": cls_loss, "loss_box": self.box_loss_weight * box_loss}
