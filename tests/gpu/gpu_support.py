"""What tests/gpu share beside their fixtures: the device they run on, the sizes, a training batch."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

DEVICE_ENV = "DENSEKIT_TEST_DEVICE"
HERE = Path(__file__).resolve().parent


def gpu_test_device() -> tuple[torch.device | None, str]:
    """The device these tests run on, or ``None`` and why they are skipped."""
    wanted = os.environ.get(DEVICE_ENV, "")
    if wanted == "cpu":
        return torch.device("cpu"), ""
    if wanted not in ("", "cuda"):
        raise pytest.UsageError(f"{DEVICE_ENV}={wanted!r}: use cuda, cpu, or leave it unset")
    if torch.cuda.is_available():
        return torch.device("cuda", 0), ""
    if wanted == "cuda":
        raise pytest.UsageError(f"{DEVICE_ENV}=cuda but torch.cuda.is_available() is False on this machine")
    return None, f"no CUDA device here ({DEVICE_ENV}=cpu runs these tests on the CPU at tiny sizes)"


@dataclass(frozen=True)
class Scale:
    """Model sizes for one device: tiny on the CPU, real on CUDA."""

    image: int  # detector input side
    seg_image: int  # segmenter input side
    batch: int
    steps: int  # training steps a test may take to see an fp16 step through GradScaler's first overflows
    detector: dict  # create_model overrides ({} = as configured)
    segmenter: dict


def image_size(kind: str, scale: Scale) -> tuple[int, int]:
    """Input (H, W) of the model ``kind`` at ``scale``."""
    side = scale.image if kind == "detector" else scale.seg_image
    return side, side


def training_batch(kind: str, scale: Scale, seed: int = 0) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """One CPU batch of images in [0, 1] and targets in the model's convention (boxes + labels, or sem_seg)."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_size(kind, scale)
    images = torch.rand(scale.batch, 3, h, w, generator=g)
    if kind == "segmenter":
        return images, [{"sem_seg": torch.randint(0, 4, (h, w), generator=g)} for _ in range(scale.batch)]
    targets = []
    for _ in range(scale.batch):
        xy = torch.rand(2, 2, generator=g) * (h / 2)
        boxes = torch.cat([xy, xy + h / 4 + torch.rand(2, 2, generator=g) * (h / 4)], 1)
        targets.append({"boxes": boxes, "labels": torch.randint(0, 3, (2,), generator=g)})
    return images, targets


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Full-fp32 matmuls and convolutions on CUDA while active: TF32 (on by default for cuDNN) keeps 10 mantissa
    bits, which a comparison with the CPU would measure instead of the code."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
