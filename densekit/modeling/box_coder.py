"""Faster R-CNN box coding in EfficientDet's (TensorFlow's) channel order."""
from __future__ import annotations

import math

import torch

# exp() of larger deltas would overflow to inf and poison NMS; no trained head comes near this.
_MAX_LOG_SCALE = math.log(1e4)


class BoxCoder:
    """Encodes boxes as offsets from anchors and back.

    Regression channels are ``(dy, dx, dh, dw)`` (y first), the order of the TF-ported EfficientDet weights:
    ``dy = (cy - cy_a) / h_a``, ``dh = log(h / h_a)``. Boxes on both sides of the coder are ``(x1, y1, x2, y2)``.

    Args:
        eps: Added to widths and heights so degenerate boxes do not produce ``log(0)``.
    """

    def __init__(self, eps: float = 1e-7) -> None:
        self.eps = eps

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Regression targets ``[..., 4]`` for ``boxes`` matched to ``anchors`` (same leading shape)."""
        wa = anchors[..., 2] - anchors[..., 0] + self.eps
        ha = anchors[..., 3] - anchors[..., 1] + self.eps
        xa = (anchors[..., 0] + anchors[..., 2]) / 2
        ya = (anchors[..., 1] + anchors[..., 3]) / 2
        w = boxes[..., 2] - boxes[..., 0] + self.eps
        h = boxes[..., 3] - boxes[..., 1] + self.eps
        x = (boxes[..., 0] + boxes[..., 2]) / 2
        y = (boxes[..., 1] + boxes[..., 3]) / 2
        return torch.stack([(y - ya) / ha, (x - xa) / wa, torch.log(h / ha), torch.log(w / wa)], -1)

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Boxes ``[..., 4]`` (x1, y1, x2, y2) from regressions and their anchors (broadcastable shapes)."""
        wa = anchors[..., 2] - anchors[..., 0]
        ha = anchors[..., 3] - anchors[..., 1]
        xa = (anchors[..., 0] + anchors[..., 2]) / 2
        ya = (anchors[..., 1] + anchors[..., 3]) / 2
        dy, dx, dh, dw = deltas.unbind(-1)
        h = torch.exp(dh.clamp(max=_MAX_LOG_SCALE)) * ha
        w = torch.exp(dw.clamp(max=_MAX_LOG_SCALE)) * wa
        y = dy * ha + ya
        x = dx * wa + xa
        return torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], -1)
