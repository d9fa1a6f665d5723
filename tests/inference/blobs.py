"""A detector whose boxes are known: it finds the bright blobs of its input, as a trained detector would find the
objects, so that the geometry of test-time augmentation and tiling (flips, rescales, offsets, seams) is checked
against where the objects really are."""
from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import torch
from torch import nn


class BlobDetector(nn.Module):
    """Detects every connected region of pixels brighter than 0.5 (any channel) at least ``min_side`` input pixels
    on both sides: box = its extent in input pixels (xyxy, pixel edges), score = its mean brightness, label = its
    brightest channel (red 0, green 1, blue 2). ``min_side`` stands for a real detector's resolution limit."""

    def __init__(self, min_side: int = 1, max_detections: int = 100) -> None:
        super().__init__()
        self.min_side = min_side
        self.postprocessor = SimpleNamespace(max_detections=max_detections, label_mask=None)
        self.num_classes = 3
        self.config = SimpleNamespace(name="blob_detector")

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [self._detect(image) for image in images]

    def _detect(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = image.permute(1, 2, 0).float().cpu().numpy()
        mask = (pixels.max(axis=2) > 0.5).astype(np.uint8)
        count, regions, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
        boxes, scores, labels = [], [], []
        for region in range(1, count):
            x, y, w, h, _ = stats[region]
            if min(w, h) < self.min_side:
                continue
            inside = pixels[regions == region]
            boxes.append([x, y, x + w, y + h])
            scores.append(float(inside.max(axis=1).mean()))
            labels.append(int(inside.mean(axis=0).argmax()))
        order = np.argsort(-np.asarray(scores), kind="stable")[: self.postprocessor.max_detections]
        return {
            "boxes": torch.tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)[order]),
            "scores": torch.tensor(np.asarray(scores, dtype=np.float32)[order]),
            "labels": torch.tensor(np.asarray(labels, dtype=np.int64)[order]),
        }


def paint(image: torch.Tensor, box: tuple[int, int, int, int], channel: int = 0, value: float = 0.9) -> None:
    """Fill ``box`` (x1, y1, x2, y2, pixel edges) of a ``[3, H, W]`` image with ``value`` in ``channel``."""
    x1, y1, x2, y2 = box
    image[channel, y1:y2, x1:x2] = value
