"""Semantic segmentation transforms (albumentations): scale / crop / flip jitter for training, full-resolution eval.

Labels are only ever resampled with nearest-neighbour interpolation, so they never gain values that were not in
the input (a blend of trainIds is meaningless, and a blend with 255 would turn ignore pixels into classes). All
random draws of one transform come from a single generator that the loader seeds per worker, as for detection.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch

from .transforms import DEFAULT_FILL, image_to_tensor

__all__ = [
    "IGNORE_INDEX",
    "SegmentationTransform",
    "build_seg_eval_transform",
    "build_seg_train_transform",
]

IGNORE_INDEX = 255
# Nearest with pixel-centre alignment (as PIL and torch's "nearest-exact"): the label stays aligned with the image,
# which is resized with centre-aligned bilinear interpolation. Plain INTER_NEAREST is shifted by half a pixel.
LABEL_INTERPOLATION = cv2.INTER_NEAREST_EXACT

# (image float32 [3, h, w] in [0, 1], label int64 [h, w] trainIds or None)
SegTransformOutput = tuple[torch.Tensor, torch.Tensor | None]


def label_to_tensor(label: np.ndarray) -> torch.Tensor:
    """``[H, W]`` integer label map -> ``int64 [H, W]`` tensor."""
    return torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))


class SegmentationTransform:
    """``(image uint8 RGB [H, W, 3], label uint8 [H, W] or None) -> (image tensor, label tensor or None)``.

    Args:
        pipeline: albumentations pipeline applied to the image and, as its ``mask``, to the label.
        transform_label: When false the label is returned unchanged (e.g. an evaluation resize that keeps the
            ground truth at the original resolution, where the official metric is computed).
    """

    def __init__(self, pipeline: A.Compose, transform_label: bool = True) -> None:
        self.pipeline = pipeline
        self.transform_label = transform_label
        self.set_random_seed(None)

    def set_random_seed(self, seed: int | None) -> None:
        """Seed every random draw of this transform (``None``: fresh OS entropy); see ``DetectionTransform``."""
        self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, image: np.ndarray, label: np.ndarray | None = None) -> SegTransformOutput:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {list(image.shape)}")
        if label is not None and label.shape != image.shape[:2]:
            raise ValueError(f"label is {list(label.shape)} but the image is {list(image.shape[:2])}")
        if label is None or not self.transform_label:
            out = self.pipeline(image=image)
            return image_to_tensor(out["image"]), None if label is None else label_to_tensor(label)
        if label.dtype != np.uint8:
            # cv2 resizes / pads uint8 masks natively; ids 0-255 all fit.
            if label.size and (label.min() < 0 or label.max() > 255):
                raise ValueError(f"label values must lie in [0, 255], got {label.min()}..{label.max()}")
            label = label.astype(np.uint8)
        out = self.pipeline(image=image, mask=label)
        return image_to_tensor(out["image"]), label_to_tensor(out["mask"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(transform_label={self.transform_label}, pipeline={self.pipeline})"


def build_seg_train_transform(
    crop_size: tuple[int, int] = (512, 1024),
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: float = 0.5,
    color_jitter: bool = False,
    fill: Sequence[float] | float = DEFAULT_FILL,
    ignore_index: int = IGNORE_INDEX,
) -> SegmentationTransform:
    """The usual Cityscapes training augmentation.

    The image is rescaled by ``s ~ U(scale_range)`` (bilinear; the label nearest), flipped horizontally, optionally
    colour-jittered, then a random ``crop_size`` window is cut out. A side shorter than the crop is padded
    (image with ``fill``, label with ``ignore_index``) at a random position.

    Args:
        crop_size: Output ``(height, width)``.
        scale_range: Range of the random rescale factor.
        hflip: Probability of a horizontal flip.
        color_jitter: Mild brightness / contrast / saturation / hue jitter of the image.
        fill: Image padding colour (RGB 0-255); the ImageNet mean by default, which normalises to zero.
        ignore_index: Label padding value.

    Returns:
        The transform; every output is exactly ``crop_size``.
    """
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    ch, cw = crop_size
    if ch < 1 or cw < 1:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    # albumentations samples the factor as 1 + U(scale_limit).
    steps: list[A.BasicTransform] = [
        A.RandomScale(
            scale_limit=(lo - 1.0, hi - 1.0),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=LABEL_INTERPOLATION,
            p=1.0 if (lo, hi) != (1.0, 1.0) else 0.0,
        )
    ]
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if color_jitter:
        steps.append(A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.02, p=0.8))
    steps.append(
        A.RandomCrop(
            ch,
            cw,
            pad_if_needed=True,
            pad_position="random",
            border_mode=cv2.BORDER_CONSTANT,
            fill=fill,
            fill_mask=ignore_index,
            p=1.0,
        )
    )
    return SegmentationTransform(A.Compose(steps))


def build_seg_eval_transform(size: tuple[int, int] | None = None, resize_label: bool = False) -> SegmentationTransform:
    """Evaluation transform: the full-resolution image, optionally resized to ``size``.

    Args:
        size: Model input ``(height, width)``; ``None`` keeps the original resolution.
        resize_label: Resize the label too (nearest). By default it stays at the original resolution, so the
            evaluator upsamples predictions to it and scores at full resolution like the official script.

    Returns:
        The transform (deterministic).
    """
    steps: list[A.BasicTransform] = []
    if size is not None:
        h, w = size
        if h < 1 or w < 1:
            raise ValueError(f"size must be positive, got {size}")
        steps.append(A.Resize(h, w, interpolation=cv2.INTER_LINEAR, mask_interpolation=LABEL_INTERPOLATION, p=1.0))
    return SegmentationTransform(A.Compose(steps), transform_label=resize_label or size is None)
