"""What a :class:`~densekit.deploy.predictor.Predictor` returns per image, and how each task gets there.

A task's ``inference`` method (:meth:`densekit.tasks.Task.inference`) returns one of the ``*Inference`` classes
here: it turns an RGB photo into the model input with the task's *evaluation* transform, so a prediction on a user's
photo is made exactly as the metrics are, and maps the model's output back to the photo's own pixels. The results
(:class:`Detections`, :class:`SegmentationMap`) know how to draw themselves and how to read as JSON, so the
predict tool writes them without asking which task made them.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.seg_transforms import SegmentationTransform
from ..data.transforms import DetectionTransform
from ..utils.visualize import draw_detections, overlay_segmentation

__all__ = ["DetectionInference", "Detections", "Inference", "Prediction", "SegmentationInference", "SegmentationMap"]

_NO_BOXES = np.zeros((0, 4), dtype=np.float32)
_NO_LABELS = np.zeros((0,), dtype=np.int64)


class Prediction(Protocol):
    """One image's result, in its original pixels."""

    height: int
    width: int
    class_names: list[str]
    #: What :meth:`tally` counts per class name, for the summary (``"detections"``, ``"pixels"``).
    tally_unit: ClassVar[str]

    def to_json(self) -> dict[str, Any]: ...

    def draw(self, image_rgb: np.ndarray) -> np.ndarray: ...

    def tally(self) -> dict[str, float]: ...

    def extra_images(self) -> dict[str, np.ndarray]: ...


@dataclass
class Detections:
    """Boxes found in one image.

    Attributes:
        boxes: ``float32 [N, 4]`` xyxy in original-image pixels, clipped to the image.
        scores: ``float32 [N]``, highest first.
        labels: ``int64 [N]`` 0-based class indices.
        class_names: The name of every label the model predicts (``class_names[labels[i]]`` names box ``i``).
        height: Original image height.
        width: Original image width.
        track_ids: ``int64 [N]`` video tracking (:mod:`densekit.inference.tracking`): each box's track id, -1 for a
            box in no confirmed track (yet); ``None`` when not tracking.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    height: int
    width: int
    track_ids: np.ndarray | None = None
    tally_unit: ClassVar[str] = "detections"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def names(self) -> list[str]:
        """The class name of each box."""
        return [self.class_names[int(label)] for label in self.labels]

    def to_json(self) -> dict[str, Any]:
        """``{"detections": [{"bbox", "score", "label", "class_name"}, ...]}``; when tracking each also has
        ``"track_id"``, ``null`` for a box in no confirmed track."""
        detections = [
            {"bbox": [float(v) for v in box], "score": float(score), "label": int(label), "class_name": name}
            for box, score, label, name in zip(self.boxes, self.scores, self.labels, self.names)
        ]
        if self.track_ids is not None:
            for detection, track_id in zip(detections, self.track_ids):
                detection["track_id"] = int(track_id) if track_id >= 0 else None
        return {"detections": detections}

    def draw(self, image_rgb: np.ndarray) -> np.ndarray:
        """A BGR copy of ``image_rgb`` (the original photo) with every box and its "name score" caption ("#7 name
        score" for a tracked box)."""
        return draw_detections(image_rgb, self.boxes, self.scores, self.labels, self.class_names, score_threshold=-1.0,
                               track_ids=self.track_ids)

    def tally(self) -> dict[str, float]:
        """Detections per class name."""
        return dict(Counter(self.names))

    def extra_images(self) -> dict[str, np.ndarray]:
        """Images to save beside the picture, by kind: none for boxes (the JSON holds them)."""
        return {}


@dataclass
class SegmentationMap:
    """The class of every pixel of one image.

    Attributes:
        label_map: ``int64 [H, W]`` class indices at the original image size.
        class_names: The name of every class index.
    """

    label_map: np.ndarray
    class_names: list[str]
    tally_unit: ClassVar[str] = "pixels"

    @property
    def height(self) -> int:
        return int(self.label_map.shape[0])

    @property
    def width(self) -> int:
        return int(self.label_map.shape[1])

    def class_fractions(self) -> dict[str, float]:
        """Share of the image's pixels per predicted class name (classes present only), largest first."""
        labels, counts = np.unique(self.label_map, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        return {self.class_names[int(labels[i])]: float(counts[i]) / self.label_map.size for i in order}

    def to_json(self) -> dict[str, Any]:
        return {"class_fractions": self.class_fractions()}

    def draw(self, image_rgb: np.ndarray) -> np.ndarray:
        """A BGR copy of ``image_rgb`` tinted by class, with a legend."""
        return overlay_segmentation(image_rgb, self.label_map, self.class_names, ignore_index=None)

    def tally(self) -> dict[str, float]:
        """Pixels per class name."""
        labels, counts = np.unique(self.label_map, return_counts=True)
        return {self.class_names[int(label)]: float(count) for label, count in zip(labels, counts)}

    def extra_images(self) -> dict[str, np.ndarray]:
        """``{"labels": class index per pixel}`` as 8-bit (16-bit beyond 256 classes) for a PNG file."""
        dtype = np.uint8 if len(self.class_names) <= 256 else np.uint16
        return {"labels": self.label_map.astype(dtype)}


class Inference(Protocol):
    """A task's prediction path: the evaluation transform in, original-image results out."""

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, dict[str, Any]]:
        """``uint8 RGB [H, W, 3]`` -> the model input ``[3, h, w]`` in [0, 1] and what ``predict`` needs to undo it."""
        ...

    def predict(self, model: nn.Module, batch: torch.Tensor, metas: Sequence[dict[str, Any]]) -> list[Prediction]:
        """Run ``model`` (eval mode) on a stacked batch of ``preprocess`` outputs."""
        ...


class DetectionInference:
    """Detection through its evaluation transform (long side resized to the input size, padded bottom / right).

    Boxes are divided by the transform's ``scale``, as the evaluation loop does before pycocotools sees them, and
    clipped to the original image (the model clips to the padded square); boxes left with no area (wholly in the
    padding) are dropped.

    Args:
        transform: The task's evaluation :class:`~densekit.data.transforms.DetectionTransform`.
        class_names: Name of each label.
        score_threshold: Keep detections scoring at least this.
    """

    def __init__(self, transform: DetectionTransform, class_names: list[str], score_threshold: float) -> None:
        self.transform = transform
        self.class_names = class_names
        self.score_threshold = score_threshold

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, dict[str, Any]]:
        tensor, _, _, scale, _ = self.transform(image, _NO_BOXES, _NO_LABELS)
        return tensor, {"scale": scale, "orig_size": image.shape[:2]}

    def predict(self, model: nn.Module, batch: torch.Tensor, metas: Sequence[dict[str, Any]]) -> list[Detections]:
        results = []
        for det, meta in zip(model(batch), metas):
            h, w = meta["orig_size"]
            boxes = det["boxes"].float().cpu() / float(meta["scale"])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            # A box that lies wholly in the padding has no area left in the photo.
            keep = (det["scores"].cpu() >= self.score_threshold) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            results.append(Detections(
                boxes[keep].numpy(), det["scores"].cpu()[keep].float().numpy(), det["labels"].cpu()[keep].numpy(),
                self.class_names, int(h), int(w),
            ))
        return results


class SegmentationInference:
    """Segmentation through its evaluation transform (full resolution, or resized to a fixed input size).

    At full resolution the model's own label maps are the answer. After a resize, the class logits are upsampled
    (bilinear) to the original size before the argmax, which keeps boundaries smoother than resizing the label map.

    Args:
        transform: The task's evaluation :class:`~densekit.data.seg_transforms.SegmentationTransform`.
        class_names: Name of each class index.
        resized: Whether ``transform`` changes the image size.
    """

    def __init__(self, transform: SegmentationTransform, class_names: list[str], resized: bool) -> None:
        self.transform = transform
        self.class_names = class_names
        self.resized = resized

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, dict[str, Any]]:
        tensor, _ = self.transform(image)
        return tensor, {"orig_size": image.shape[:2]}

    def predict(self, model: nn.Module, batch: torch.Tensor, metas: Sequence[dict[str, Any]]) -> list[SegmentationMap]:
        if not self.resized:
            maps = [out["sem_seg"] for out in model(batch)]
        else:
            logits = model.forward_raw(batch)
            maps = [
                F.interpolate(lg[None].float(), size=tuple(meta["orig_size"]), mode="bilinear", align_corners=False)[0].argmax(0)
                for lg, meta in zip(logits, metas)
            ]
        return [SegmentationMap(m.cpu().numpy().astype(np.int64), self.class_names) for m in maps]
