"""Sliced inference for images much larger than the model's input (``predict.slice=[H, W]``, ``eval.slice=[H, W]``):
small objects that one downscaled pass shrinks below what the detector resolves are found in overlapping tiles at
(near) full resolution.

densekit does its own tiling rather than SAHI's (the approach is SAHI's: Akyon et al., 2022): SAHI crops and runs
one tile at a time through a framework adapter, in numpy; here the tiles of an image are one tensor batch through the
model and its own post-processing, boxes go back to the image with two tensor ops, and the merge is
:func:`densekit.inference.merge.greedy_merge`: greedy merging by intersection over the smaller box, as SAHI merges,
but only for boxes a tile border cut (:func:`cut_by_tile`), which joins the parts of an object a seam cut; uncut
boxes merge as NMS would, so a coarse box cannot swallow accurate ones. An optional full-image pass catches the
objects larger than a tile.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Detections, DetectorWrapper
from .merge import concat_detections, keep_best, merge_detections, scoring_at_least


@dataclass(frozen=True)
class SliceSettings:
    """How :class:`SlicedDetector` tiles an image.

    Args:
        size: Tile ``(height, width)`` in original-image pixels; each tile is resized to the model's input size
            (long side), so a tile the size of the model's input is seen at full resolution.
        overlap: Fraction of a tile shared with its neighbour, per axis (0.2: an object up to a fifth of a tile
            wide lies whole in some tile).
        full_image: Also run the whole image, resized to the model's input (finds objects larger than a tile).
        merge: ``"greedy"`` (merge overlapping same-class boxes into their union; joins objects cut by a seam) or
            ``"nms"``.
        match_threshold: Overlap above which boxes merge: intersection over the smaller box (greedy) or IoU (nms).
        batch_size: Tiles per forward pass.
    """

    size: tuple[int, int]
    overlap: float = 0.2
    full_image: bool = True
    merge: str = "greedy"
    match_threshold: float = 0.5
    batch_size: int = 8

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"slice must be [height, width] in pixels, got {list(self.size)}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"slice_overlap must lie in [0, 1), got {self.overlap}")
        if self.merge not in ("greedy", "nms"):
            raise ValueError(f"slice_merge={self.merge!r}: choose greedy or nms")
        if self.batch_size < 1:
            raise ValueError(f"the slice batch size must be at least 1, got {self.batch_size}")

    @classmethod
    def from_config(cls, section: Any) -> SliceSettings | None:
        """The settings of an ``eval`` / ``predict`` config section (``slice``, ``slice_overlap``,
        ``slice_full_image``, ``slice_merge``, ``slice_match``, ``batch_size``); ``None`` without ``slice``."""
        size = section.get("slice")
        if size is None:
            return None
        return cls(size=tile_size(size), overlap=float(section.get("slice_overlap", 0.2)),
                   full_image=bool(section.get("slice_full_image", True)), merge=str(section.get("slice_merge", "greedy")),
                   match_threshold=float(section.get("slice_match", 0.5)), batch_size=int(section.get("batch_size", 8)))

    def describe(self) -> str:
        full = " + the full image" if self.full_image else ""
        return (f"sliced: {self.size[0]}x{self.size[1]} tiles, overlap {self.overlap:g}{full}, merged by {self.merge} "
                f"at {self.match_threshold:g}")


def tile_size(size: int | float | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` of a tile given as one side or as ``[H, W]``."""
    sides = [int(size)] * 2 if isinstance(size, (int, float)) else [int(s) for s in size]
    if len(sides) != 2:
        raise ValueError(f"slice must be [height, width] in pixels, got {sides}")
    return sides[0], sides[1]


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length``, consecutive ones sharing ``overlap`` of a tile;
    the last tile ends at the border (shifted back rather than cut short), and one tile covers a short side."""
    if length <= tile:
        return [0]
    step = max(1, int(tile * (1.0 - overlap)))
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def tile_windows(height: int, width: int, settings: SliceSettings) -> list[tuple[int, int, int, int]]:
    """``(y0, x0, y1, x1)`` of every tile of an image, row by row; all of one size (the tile, or the image's side
    where the image is smaller)."""
    th, tw = min(settings.size[0], height), min(settings.size[1], width)
    return [(y, x, y + th, x + tw) for y in tile_starts(height, th, settings.overlap)
            for x in tile_starts(width, tw, settings.overlap)]


#: A box within this many pixels of an inner tile border was cut by it.
CUT_MARGIN = 2.0


def cut_by_tile(boxes: torch.Tensor, window: tuple[int, int, int, int], height: int, width: int) -> torch.Tensor:
    """Which ``boxes`` (image pixels) reach a border of their tile ``window`` (y0, x0, y1, x1) that lies inside the
    image: the tile saw only part of those objects."""
    y0, x0, y1, x1 = window
    inner = boxes.new_tensor([x0 > 0, y0 > 0, x1 < width, y1 < height], dtype=torch.bool)
    edges = boxes.new_tensor([x0, y0, x1, y1], dtype=torch.float32)
    near = torch.stack([boxes[:, 0] <= edges[0] + CUT_MARGIN, boxes[:, 1] <= edges[1] + CUT_MARGIN,
                        boxes[:, 2] >= edges[2] - CUT_MARGIN, boxes[:, 3] >= edges[3] - CUT_MARGIN], dim=1)
    return (near & inner).any(dim=1)


def _resize_long_side(images: torch.Tensor, input_size: int) -> tuple[torch.Tensor, float]:
    """``images`` with their long side resized to ``input_size`` (as the evaluation transform does), and the factor."""
    h, w = images.shape[-2:]
    scale = input_size / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size == (h, w):
        return images, 1.0
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False), scale


class SlicedDetector(DetectorWrapper):
    """``model`` run on overlapping tiles of each full-resolution image (and optionally the whole image), the
    detections mapped to the image's pixels and merged.

    Takes what a detector takes, but at the images' own resolution (``[B, 3, H, W]`` in [0, 1], each image its
    whole extent, or a list of ``[3, H, W]``), and returns one ``{"boxes", "scores", "labels"}`` per image.

    Args:
        model: A detector in eval mode, or a :class:`~densekit.inference.tta.DetectionTTA` (TTA on every tile).
        settings: Tiles and merge.
        input_size: The model's input side: tiles and the full image are resized to it (long side).
        score_threshold: Detections below this are dropped before merging.
    """

    def __init__(self, model: nn.Module, settings: SliceSettings, input_size: int, score_threshold: float = 0.0) -> None:
        super().__init__(model)
        self.settings = settings
        self.input_size = int(input_size)
        self.score_threshold = score_threshold

    @torch.inference_mode()
    def forward(self, images: torch.Tensor | Sequence[torch.Tensor]) -> list[Detections]:
        return [self.detect(image) for image in images]

    def detect(self, image: torch.Tensor) -> Detections:
        """One ``[3, H, W]`` image's merged detections, in its pixels."""
        height, width = image.shape[-2:]
        windows = tile_windows(height, width, self.settings)
        parts = []
        for first in range(0, len(windows), self.settings.batch_size):
            chunk = windows[first:first + self.settings.batch_size]
            tiles = torch.stack([image[:, y0:y1, x0:x1] for y0, x0, y1, x1 in chunk])
            resized, scale = _resize_long_side(tiles, self.input_size)
            for det, window in zip(self.model(resized), chunk):
                offset = torch.tensor([window[1], window[0]] * 2, dtype=torch.float32, device=image.device)
                boxes = det["boxes"].float() / scale + offset
                parts.append({**det, "boxes": boxes, "cut": cut_by_tile(boxes, window, height, width)})
        if self.settings.full_image and len(windows) > 1:
            resized, scale = _resize_long_side(image[None], self.input_size)
            det = self.model(resized)[0]
            parts.append({**det, "boxes": det["boxes"].float() / scale,
                          "cut": torch.zeros(len(det["scores"]), dtype=torch.bool, device=image.device)})
        union = scoring_at_least(concat_detections(parts), self.score_threshold)
        if len(parts) == 1:  # the image is one tile: the model's own detections, nothing to merge
            return keep_best(union, self.max_detections)
        limits = torch.tensor([width, height, width, height], dtype=torch.float32, device=image.device)
        union["boxes"] = torch.minimum(union["boxes"].clamp(min=0), limits)
        return merge_detections(union, self.settings.merge, self.settings.match_threshold, 1, self.max_detections)
