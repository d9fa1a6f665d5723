"""The item every semantic segmentation dataset returns, written once for all of them (Cityscapes, own folders)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .checks import (
    DatasetFiles, ImageProblem, exif_frame_hint, file_problem, header_size, placeholder_item, read_item,
)
from .decode import decode_file
from .seg_transforms import SegTransformOutput, label_to_tensor
from .transforms import image_to_tensor

Transform = Callable[[np.ndarray, "np.ndarray | None"], SegTransformOutput]


class SegmentationDataset(Dataset, ABC):
    """Images with class-index label maps. Subclasses find the files and validate labels; items are the same for all.

    Items are ``(image, target)``: ``image`` float ``[3, H, W]`` in [0, 1] after the transform, ``target`` a dict
    with ``sem_seg`` (int64 ``[H, W]`` class indices, 255 = ignore; ``None`` without labels), ``file`` (image
    path), ``label_file`` (``None`` without labels), ``orig_size`` ``(H, W)`` of the decoded image, ``size``
    ``(h, w)`` of the returned image, plus what :meth:`extra_target` adds.

    Images are decoded in the frame their EXIF orientation declares, as every densekit dataset does (``exif``,
    ``data.exif_orientation``, so ``orig_size`` is the displayed frame's); label PNGs are read as stored, so they
    must be drawn in the same frame, which :meth:`check_label_size` checks as far as sizes tell.

    Subclasses set ``transform``, ``has_labels``, ``class_names`` and ``label_ids`` (class index -> the value
    the dataset's own label files store, how predictions are written back), and may set ``exif`` and
    ``unreadable``.
    """

    transform: Transform | None
    has_labels: bool
    class_names: tuple[str, ...] | list[str]
    label_ids: np.ndarray
    #: Decode images in their displayed frame (EXIF orientation applied); ``False``: the stored pixel frame.
    exif: bool = True
    #: What an image or label that cannot be read does: ``"raise"``, ``"skip"`` (evaluation) or ``"replace"``
    #: (training), see :func:`densekit.data.checks.unreadable_policy` (``data.skip_unreadable``).
    unreadable: str = "raise"

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

    def check_label_size(self, index: int, label_file: Path, label_shape: tuple[int, ...],
                         image_size: tuple[int, int] | None) -> None:
        """Raise ``ValueError`` naming both files unless the label is ``image_size`` (the decoded image's; ``None``:
        nothing to check). When the label is the size of the image's other EXIF frame, the error says which and
        names ``data.exif_orientation``."""
        if image_size is None or tuple(label_shape[:2]) == tuple(image_size):
            return
        image = self.image_path(index)
        raise ValueError(
            f"label file {label_file} is {label_shape[0]}x{label_shape[1]} (HxW) but its image {image} is "
            f"{image_size[0]}x{image_size[1]}" + self._exif_hint(image, tuple(label_shape[:2]), image_size)
        )

    def _exif_hint(self, image: Path, label_size: tuple[int, ...], image_size: tuple[int, int]) -> str:
        # Only on the error path: read the image's size in the frame it was not decoded in (from its header).
        try:
            other = header_size(image, exif=not self.exif)
        except OSError:
            return ""
        if other == tuple(image_size) or other != label_size:
            return ""
        return exif_frame_hint(self.exif, "the label describes", "the label was")

    def listed_files(self, name: str) -> DatasetFiles:
        """The images of this dataset for the check before training (:func:`densekit.data.checks.check_images`),
        each with its label file, which must be readable and fit its image."""
        return DatasetFiles(name, [self.image_path(i) for i in range(len(self))], self.exif, self._label_problem)

    def _label_problem(self, index: int, image_size: tuple[int, int]) -> ImageProblem | None:
        """What is wrong with the label file of item ``index``, whose image is ``image_size``; from its header."""
        label = self.label_path(index)
        if label is None:
            return None
        image = self.image_path(index)
        problem = file_problem(label, "label")
        if problem is not None:
            return ImageProblem(image, problem.message)
        try:
            size = header_size(label, exif=False)  # label files are read as stored
        except OSError as error:
            return ImageProblem(image, f"label file {label} is not a readable image ({error})")
        try:
            self.check_label_size(index, label, size, image_size)
        except ValueError as error:
            return ImageProblem(image, str(error), unreadable=False)
        return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return read_item(self._load, index, len(self), self.unreadable, self._placeholder)

    def _placeholder(self, index: int, error: OSError) -> tuple[torch.Tensor, dict[str, Any]]:
        return placeholder_item(error, file=str(self.image_path(index)), **self.extra_target(index))

    def _load(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        path = self.image_path(index)
        image = decode_file(path, exif=self.exif)  # its errors name the file
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
