"""Multi-level anchor boxes (RetinaNet / EfficientDet layout)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def feature_sizes(image_size: Sequence[int], max_level: int) -> list[tuple[int, int]]:
    """(H, W) of every level 0..max_level, each the ceil-half of the one below (TF 'SAME' striding)."""
    h, w = int(image_size[0]), int(image_size[1])
    sizes = [(h, w)]
    for _ in range(max_level):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


class AnchorGenerator(nn.Module):
    """Anchors for levels ``min_level .. max_level``.

    At every level, for every feature-map location (row-major), ``num_scales * len(aspect_ratios)`` anchors in the
    order (octave scale, aspect ratio); levels are concatenated finest first. This is the order the head's outputs
    flatten to, and the order of the public EfficientDet checkpoints.

    Args:
        min_level: Finest level.
        max_level: Coarsest level.
        num_scales: Octave scales per level: ``2 ** (i / num_scales)``.
        aspect_ratios: ``(w, h)`` multipliers, e.g. ``(1.4, 0.7)`` for a wide anchor.
        anchor_scale: Base anchor size in units of the level's stride.
    """

    def __init__(
        self,
        min_level: int = 3,
        max_level: int = 7,
        num_scales: int = 3,
        aspect_ratios: Sequence[Sequence[float]] = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4)),
        anchor_scale: float = 4.0,
    ) -> None:
        super().__init__()
        self.min_level, self.max_level = min_level, max_level
        self.num_scales = num_scales
        self.aspect_ratios = [tuple(float(v) for v in r) for r in aspect_ratios]
        self.anchor_scale = float(anchor_scale)
        self._cache: dict[tuple[int, int, str], torch.Tensor] = {}

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map location."""
        return self.num_scales * len(self.aspect_ratios)

    def forward(self, image_size: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """Anchors ``[N, 4]`` as ``(x1, y1, x2, y2)`` in input pixels for an ``(H, W)`` input, cached per size."""
        key = (int(image_size[0]), int(image_size[1]), str(device))
        if key not in self._cache:
            self._cache[key] = self._generate(key[:2]).to(device)
        return self._cache[key]

    def _generate(self, image_size: tuple[int, int]) -> torch.Tensor:
        # float64 on the grid, float32 at the end: the same rounding as the reference anchors.
        sizes = feature_sizes(image_size, self.max_level)
        octaves = torch.arange(self.num_scales, dtype=torch.float64) / self.num_scales
        aspects = torch.tensor(self.aspect_ratios, dtype=torch.float64)  # [R, 2] as (w, h)
        # [S*R, 2] half-extents (w/2, h/2) per stride unit, ordered (scale, aspect).
        half = (self.anchor_scale * 2.0**octaves)[:, None, None] * aspects[None] / 2.0
        half = half.reshape(-1, 2)
        levels = []
        for level in range(self.min_level, self.max_level + 1):
            stride_y = image_size[0] / sizes[level][0]
            stride_x = image_size[1] / sizes[level][1]
            ys = torch.arange(stride_y / 2, image_size[0], stride_y, dtype=torch.float64)
            xs = torch.arange(stride_x / 2, image_size[1], stride_x, dtype=torch.float64)
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            centers = torch.stack([cx.reshape(-1), cy.reshape(-1)], -1)  # [HW, 2]
            extent = half * torch.tensor([stride_x, stride_y], dtype=torch.float64)  # [A, 2]
            boxes = torch.cat([centers[:, None] - extent[None], centers[:, None] + extent[None]], -1)
            levels.append(boxes.reshape(-1, 4))
        return torch.cat(levels).float()
