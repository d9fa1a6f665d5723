"""Common image corruptions for robustness evaluation: Gaussian noise and Gaussian blur as in ImageNet-C.

The severities follow Hendrycks & Dietterich ("Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019), whose images are ~224 px like the embedded synthetic set's 160-320 px: Gaussian noise
of standard deviation 0.08 / 0.12 / 0.18 / 0.26 / 0.38 (images in [0, 1]), Gaussian blur of sigma 1 / 2 / 3 / 4 / 6
pixels. The corruption is applied to the original image, before any resizing, so it is the same whatever the
model's input size, and it is deterministic: the noise of an image is seeded by its content, so every evaluation
of a dataset sees the same corrupted images (and no transform needs to know image indices).

``data.corruption=gaussian_noise data.corruption_severity=3`` makes a detection dataset's evaluation images
corrupted (:func:`corrupting`, wired in ``densekit.tasks.detection``).
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

GAUSSIAN_NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)
GAUSSIAN_BLUR_SIGMA = (1.0, 2.0, 3.0, 4.0, 6.0)


def gaussian_noise(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """``image`` (uint8 RGB) plus zero-mean Gaussian noise of ImageNet-C's standard deviation, clipped."""
    rng = np.random.default_rng(seed)
    x = image.astype(np.float32) / 255.0
    noisy = x + rng.normal(0.0, GAUSSIAN_NOISE_STD[severity - 1], size=x.shape).astype(np.float32)
    return (np.clip(noisy, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def gaussian_blur(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """``image`` (uint8 RGB) blurred by a Gaussian of ImageNet-C's sigma (cv2, kernel from sigma, mirrored edges)."""
    del seed  # deterministic
    sigma = GAUSSIAN_BLUR_SIGMA[severity - 1]
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
}


def corrupt(image: np.ndarray, kind: str, severity: int) -> np.ndarray:
    """``image`` (uint8 RGB ``[H, W, 3]``) with corruption ``kind`` at ``severity`` (1-5), seeded by its content.

    Raises:
        ValueError: unknown kind or severity, naming the ``data.corruption*`` key and the choices.
    """
    check_corruption(kind, severity)
    seed = zlib.crc32(np.ascontiguousarray(image).tobytes())
    return CORRUPTIONS[kind](image, int(severity), seed)


def check_corruption(kind: str, severity: int) -> None:
    if kind not in CORRUPTIONS:
        raise ValueError(f"data.corruption must be one of {', '.join(CORRUPTIONS)} (or null), got {kind!r}")
    if int(severity) not in range(1, 6):
        raise ValueError(f"data.corruption_severity must be 1-5 (ImageNet-C's levels), got {severity!r}")


class CorruptThenTransform:
    """Apply a corruption to the original image, then ``transform`` (a detection transform's calling convention:
    ``(image, boxes, labels) -> ...``; boxes and labels pass through untouched)."""

    def __init__(self, transform: Callable[..., Any], kind: str, severity: int) -> None:
        check_corruption(kind, severity)
        self.transform = transform
        self.kind = kind
        self.severity = int(severity)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> Any:
        return self.transform(corrupt(image, self.kind, self.severity), boxes, labels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind}, severity={self.severity}, then {self.transform!r})"


def corrupting(transform: Callable[..., Any], data_cfg: Any) -> Callable[..., Any]:
    """``transform``, preceded by ``data.corruption`` at ``data.corruption_severity`` (default 3) when set."""
    kind = data_cfg.get("corruption") if hasattr(data_cfg, "get") else None
    if not kind:
        return transform
    return CorruptThenTransform(transform, str(kind), int(data_cfg.get("corruption_severity") or 3))
