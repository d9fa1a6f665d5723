"""Detection transforms: EfficientDet's scale jitter for training, resize-and-pad for evaluation.

Both are albumentations pipelines split in two stages: a resize, whose output size gives the exact ``scale``
(input pixels per original pixel) the evaluator divides predictions by, and the rest (flip, colour, crop, pad).
All random draws of one transform come from a single generator that :func:`build_loader` seeds per
worker, so augmentations differ between workers but repeat from run to run.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch

from ..config import IMAGENET_MEAN

# (image [3, S, S] float in [0, 1], boxes [M, 4] float32 xyxy, labels [M] int64, scale, (H, W) before padding)
TransformOutput = tuple[torch.Tensor, np.ndarray, np.ndarray, float, tuple[int, int]]

# Padding with the mean colour makes padded pixels zero after normalisation, like the model's own padding.
DEFAULT_FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, 3]`` -> ``float32 [3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def keep_original_size(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> TransformOutput:
    """The transform that changes nothing: the image as a tensor at its own size (``scale`` 1), for sliced
    inference, which tiles the full-resolution image itself (:mod:`densekit.inference.slicing`)."""
    return (image_to_tensor(image), np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64).reshape(-1), 1.0, (int(image.shape[0]), int(image.shape[1])))


def _bbox_params(min_visibility: float = 0.0) -> A.BboxParams:
    # clip + filter_invalid: callers may pass boxes slightly outside the image; min_width/height drop boxes that
    # a downscale or crop shrinks below a pixel, min_visibility those mostly cropped away.
    return A.BboxParams(
        format="pascal_voc",
        label_fields=["labels"],
        clip=True,
        filter_invalid_bboxes=True,
        min_width=1.0,
        min_height=1.0,
        min_visibility=min_visibility,
    )


class DetectionTransform:
    """``(image uint8 RGB [H, W, 3], boxes [M, 4] xyxy, labels [M]) -> TransformOutput``.

    Args:
        resize: Pipeline that only resizes, keeping the aspect ratio (its output size defines ``scale``).
        augment: Pipeline applied after it (flip / colour / crop / pad to ``image_size``).
        image_size: Side of the square output.
    """

    def __init__(self, resize: A.Compose, augment: A.Compose, image_size: int) -> None:
        self.resize = resize
        self.augment = augment
        self.image_size = image_size
        self.set_random_seed(None)

    def set_random_seed(self, seed: int | None) -> None:
        """Seed every random draw of this transform (``None``: fresh OS entropy).

        albumentations' own ``set_random_seed`` gives each child transform an identically seeded generator, which
        would correlate e.g. the flip with the crop offset; sharing one generator keeps the draws independent.
        """
        rng, py_rng = np.random.default_rng(seed), random.Random(seed)
        self.resize.set_random_state(rng, py_rng)
        self.augment.set_random_state(rng, py_rng)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> TransformOutput:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {list(image.shape)}")
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(boxes) != len(labels):
            raise ValueError(f"got {len(boxes)} boxes but {len(labels)} labels")
        out = self.resize(image=image, bboxes=boxes, labels=labels)
        rh, rw = out["image"].shape[:2]
        # LongestMaxSize makes the long side exactly the sampled size, so this ratio is the factor it used.
        scale = max(rh, rw) / max(image.shape[:2])
        out = self.augment(image=out["image"], bboxes=out["bboxes"], labels=out["labels"])
        s = self.image_size
        if out["image"].shape[:2] != (s, s):  # pragma: no cover - guards a change in albumentations' semantics
            raise RuntimeError(f"transform produced {out['image'].shape[:2]}, expected {(s, s)}")
        return (
            image_to_tensor(out["image"]),
            np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4),
            np.asarray(out["labels"], dtype=np.int64).reshape(-1),
            float(scale),
            (min(rh, s), min(rw, s)),  # the crop keeps at most s x s of the resized image, from its top-left
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, resize={self.resize}, augment={self.augment})"


def build_train_transform(
    image_size: int,
    scale_range: tuple[float, float] = (0.1, 2.0),
    hflip: float = 0.5,
    color_jitter: bool = False,
    min_visibility: float = 0.25,
    fill: Sequence[float] | float = DEFAULT_FILL,
) -> DetectionTransform:
    """EfficientDet's training augmentation (scale jitter).

    The long side is resized to ``image_size * u``, ``u ~ U(scale_range)``, the image is optionally flipped and
    colour-jittered, then a random ``image_size`` square is cropped (sides shorter than that are padded at the
    bottom / right instead). Boxes are clipped; those under 1 px wide or high, or with less than
    ``min_visibility`` of their area left inside the crop, are dropped with their labels.

    Args:
        image_size: Side of the square output.
        scale_range: Range of the random long-side factor.
        hflip: Probability of a horizontal flip.
        color_jitter: Mild brightness / contrast / saturation / hue jitter.
        min_visibility: Keep a cropped box only if at least this fraction of it stays inside the crop.
        fill: Padding colour (RGB 0-255); defaults to the ImageNet mean.

    Returns:
        The transform; its ``scale`` output is the jittered factor (input pixels per original pixel).
    """
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    # Every integer long side in the range: a uniform scale, sampled by albumentations' (seedable) generator.
    sides = list(range(max(1, round(lo * image_size)), max(1, round(hi * image_size)) + 1))
    resize = A.Compose([A.LongestMaxSize(max_size=sides, p=1.0)], bbox_params=_bbox_params())
    augment: list[A.BasicTransform] = []
    if hflip > 0:
        augment.append(A.HorizontalFlip(p=hflip))  # before the crop, so padding stays at the bottom / right
    if color_jitter:
        augment.append(A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.8))
    augment.append(
        A.RandomCrop(
            image_size,
            image_size,
            pad_if_needed=True,
            pad_position="top_left",  # image at the top-left: pads go bottom / right
            border_mode=cv2.BORDER_CONSTANT,
            fill=fill,
            p=1.0,
        )
    )
    return DetectionTransform(resize, A.Compose(augment, bbox_params=_bbox_params(min_visibility)), image_size)


def build_eval_transform(image_size: int, fill: Sequence[float] | float = DEFAULT_FILL) -> DetectionTransform:
    """Resize the long side to ``image_size`` (keeping the aspect ratio) and pad bottom / right to a square.

    Returns:
        The transform; its ``scale`` output is ``image_size / max(H, W)``, so a prediction divided by it is in
        original-image pixels (to within half an input pixel on the short side, which is rounded).
    """
    resize = A.Compose([A.LongestMaxSize(max_size=image_size, p=1.0)], bbox_params=_bbox_params())
    pad = A.PadIfNeeded(
        image_size, image_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=fill, p=1.0
    )
    return DetectionTransform(resize, A.Compose([pad], bbox_params=_bbox_params()), image_size)
