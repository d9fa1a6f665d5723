"""The item every semantic segmentation dataset returns, written once for all of them (Cityscapes, own folders)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .coco import read_image
from .seg_transforms import SegTransformOutput, label_to_tensor
from .transforms import image_to_tensor

Transform = Callable[[np.ndarray, "np.ndarray | None"], SegTransformOutput]


class SegmentationDataset(Dataset, ABC):
    """Images with class-index label maps. Subclasses find the files and validate labels; items are the same for all.

    Items are ``(image, target)``: ``image`` float ``[3, H, W]`` in [0, 1] after the transform, ``target`` a dict
    with ``sem_seg`` (int64 ``[H, W]`` class indices, 255 = ignore; ``None`` without labels), ``file`` (image
    path), ``label_file`` (``None`` without labels), ``orig_size`` ``(H, W)`` of the stored image, ``size``
    ``(h, w)`` of the returned image, plus what :meth:`extra_target` adds.

    Subclasses set ``transform``, ``has_labels``, ``class_names`` and ``label_ids`` (class index -> the value
    the dataset's own label files store, how predictions are written back).
    """

    transform: Transform | None
    has_labels: bool
    class_names: tuple[str, ...] | list[str]
    label_ids: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abstractmethod
    def image_path(self, index: int) -> Path: ...

    @abstractmethod
    def label_path(self, index: int) -> Path | None: ...

    @abstractmethod
    def load_label(self, index: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """The validated label of an image as class indices, ``uint8 [H, W]`` (255 = ignore)."""

    def extra_target(self, index: int) -> dict[str, Any]:
        """Dataset-specific target keys (none by default)."""
        return {}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        path = self.image_path(index)
        image = read_image(path)  # its errors name the file
        orig_size = (int(image.shape[0]), int(image.shape[1]))
        label = self.load_label(index, orig_size) if self.has_labels else None
        if self.transform is not None:
            tensor, sem_seg = self.transform(image, label)
        else:
            tensor, sem_seg = image_to_tensor(image), None if label is None else label_to_tensor(label)
        label_file = self.label_path(index)
        target = {
            "sem_seg": sem_seg,
            "file": str(path),
            "label_file": None if label_file is None else str(label_file),
            "orig_size": orig_size,
            "size": (int(tensor.shape[-2]), int(tensor.shape[-1])),
            **self.extra_target(index),
        }
        return tensor, target
