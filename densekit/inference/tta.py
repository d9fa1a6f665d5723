"""Test-time augmentation for detectors (``eval.tta=true``, ``predict.tta=true``, ``Predictor(tta=True)``): the
model also sees the batch flipped left-right and rescaled, each pass's detections (the model's own post-processing:
decoding, NMS, top-k) are mapped back to the input's pixels, and the union is merged by weighted box fusion or NMS.

:class:`DetectionTTA` wraps a detector and keeps its calling convention (``model(images)`` -> one ``{"boxes",
"scores", "labels"}`` dict per image, boxes in input pixels), so the evaluation loop, :class:`densekit.Predictor`
and sliced inference run it as they run the model.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Detections, DetectorWrapper
from .merge import concat_detections, merge_detections, scoring_at_least


@dataclass(frozen=True)
class TTASettings:
    """What :class:`DetectionTTA` runs.

    Args:
        scales: Input rescales, each a pass (``1.0``: the plain input). Scales above 1 help small objects, below 1
            large ones; every pass costs about ``scale**2`` of a plain forward pass.
        flip: Each scale also flipped left-right.
        merge: ``"wbf"`` (weighted box fusion: boxes averaged, scores down-weighted where few passes agree) or
            ``"nms"`` (class-wise NMS over the union).
        iou: The merge's IoU threshold.
    """

    scales: tuple[float, ...] = (1.0,)
    flip: bool = True
    merge: str = "wbf"
    iou: float = 0.55

    def __post_init__(self) -> None:
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"tta_scales must be positive numbers, got {list(self.scales)}")
        if self.merge not in ("wbf", "nms"):
            raise ValueError(f"tta_merge={self.merge!r}: choose wbf or nms")
        if not 0.0 < self.iou <= 1.0:
            raise ValueError(f"tta_iou must lie in (0, 1], got {self.iou}")

    @property
    def num_passes(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)

    @classmethod
    def from_config(cls, section: Any) -> TTASettings | None:
        """The settings of an ``eval`` / ``predict`` config section (``tta``, ``tta_scales``, ``tta_flip``,
        ``tta_merge``, ``tta_iou``); ``None`` when ``tta`` is off."""
        if not section.get("tta", False):
            return None
        return cls(scales=tuple(float(s) for s in section.get("tta_scales", [1.0])), flip=bool(section.get("tta_flip", True)),
                   merge=str(section.get("tta_merge", "wbf")), iou=float(section.get("tta_iou", 0.55)))

    def describe(self) -> str:
        scales = ", ".join(f"{s:g}" for s in self.scales)
        return f"TTA: scales [{scales}]{' + flips' if self.flip else ''}, {self.num_passes} passes merged by {self.merge}"


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Boxes xyxy of a left-right flipped image of ``width`` pixels, in the unflipped image (x -> width - x)."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


class DetectionTTA(DetectorWrapper):
    """``model`` run on flipped / rescaled copies of each batch, the detections merged (see :class:`TTASettings`).

    Args:
        model: A detector in eval mode (an :class:`~densekit.modeling.detector.EfficientDet`, an optimised copy).
        settings: The passes and the merge.
        score_threshold: Detections below this are dropped before merging (the evaluation's threshold).
    """

    def __init__(self, model: nn.Module, settings: TTASettings, score_threshold: float = 0.0) -> None:
        super().__init__(model)
        self.settings = settings
        self.score_threshold = score_threshold

    @torch.inference_mode()
    def passes(self, images: torch.Tensor) -> list[list[Detections]]:
        """Per pass (scales in order, each plain then flipped), each image's detections in ``images``' pixels."""
        height, width = images.shape[-2:]
        results = []
        for scale in self.settings.scales:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = images if size == (height, width) else F.interpolate(
                images, size=size, mode="bilinear", align_corners=False)
            back = torch.tensor([width / size[1], height / size[0]] * 2, device=images.device)
            for flipped in (False, True) if self.settings.flip else (False,):
                outputs = self.model(scaled.flip(-1) if flipped else scaled)
                per_image = []
                for det in outputs:
                    boxes = flip_boxes(det["boxes"].float(), size[1]) if flipped else det["boxes"].float()
                    per_image.append({"boxes": boxes * back, "scores": det["scores"].float(), "labels": det["labels"]})
                results.append(per_image)
        return results

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor]) -> list[Detections]:
        if not isinstance(images, torch.Tensor):  # images of different sizes: one batch each
            return [det for image in images for det in self.forward(image[None])]
        passes = self.passes(images)
        merged = []
        for index in range(images.shape[0]):
            union = scoring_at_least(concat_detections([per_image[index] for per_image in passes]), self.score_threshold)
            merged.append(merge_detections(union, self.settings.merge, self.settings.iou, self.settings.num_passes,
                                           self.max_detections))
        return merged

