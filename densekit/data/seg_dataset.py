"""The item every semantic segmentation dataset returns, written once for all of them (Cityscapes, own folders)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .decode import decode_file
from .seg_transforms import SegTransformOutput, label_to_tensor
from .transforms import image_to_tensor

Transform = Callable[[np.ndarray, "np.ndarray | None"], SegTransformOutput]


def exif_frame_hint(exif: bool, described: str, drawn: str) -> str:
    """What a size-mismatch error adds when the annotation fits the image's *other* frame (stored vs. displayed,
    see :mod:`densekit.data.decode`): which frame it is in, and the ``data.exif_orientation`` value that loads the
    image in that frame.

    Args:
        exif: Whether the image was decoded in its displayed frame (``data.exif_orientation``).
        described: The annotation and its verb, e.g. ``"the json describes"``, ``"the label describes"``.
        drawn: The annotation as the subject of "drawn on it", e.g. ``"the boxes were"``, ``"the label was"``.
    """
    if exif:
        return (f" (its EXIF orientation rotates it: {described} the stored frame; if {drawn} drawn on it, "
                "set data.exif_orientation=false)")
    return f" (its EXIF orientation rotates it: {described} the displayed frame; set data.exif_orientation=true)"


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
    the dataset's own label files store, how predictions are written back), and may set ``exif``.
    """

    transform: Transform | None
    has_labels: bool
    class_names: tuple[str, ...] | list[str]
    label_ids: np.ndarray
    #: Decode images in their displayed frame (EXIF orientation applied); ``False``: the stored pixel frame.
    exif: bool = True

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
        from .converters.common import image_size as header_size

        try:
            other = header_size(image, exif=not self.exif)
        except OSError:
            return ""
        if other == tuple(image_size) or other != label_size:
            return ""
        return exif_frame_hint(self.exif, "the label describes", "the label was")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
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
