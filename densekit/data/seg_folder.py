"""Semantic segmentation on one's own data: an image folder, a folder of single-channel label PNGs, a class list.

The layout of mmsegmentation's custom dataset and of ADE20K: ``<images>/<rel>/<name><image suffix>`` pairs with
``<labels>/<rel>/<name><label suffix>`` (sub-folders allowed), each label pixel a class index ``0..C-1`` or the
ignore value. ``reduce_zero_label`` reads ADE20K-style labels, where 0 means "other" (ignored) and class ``i`` is
stored as ``i + 1``. Pairing is checked when the dataset is built (a missing label fails at startup with its
path); values are checked per item, naming the file.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cityscapes import read_label
from .media import IMAGE_SUFFIXES
from .seg_dataset import SegmentationDataset, Transform
from .seg_transforms import IGNORE_INDEX


def read_class_names(classes: Sequence[str] | str | Path) -> list[str]:
    """Class names from a list, or from a text file with one name per line (blank lines skipped)."""
    if isinstance(classes, (str, Path)):
        path = Path(classes).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"class list {path} does not exist (one class name per line)")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        names = [str(name) for name in classes]
    if not names:
        raise ValueError(f"the class list {classes!r} is empty")
    if len(set(names)) != len(names):
        raise ValueError(f"the class list {classes!r} repeats names")
    if len(names) >= IGNORE_INDEX:
        raise ValueError(f"{len(names)} classes do not fit 8-bit label PNGs with ignore value {IGNORE_INDEX}")
    return names


class SegmentationFolder(SegmentationDataset):
    """Images + single-channel label PNGs + a class list, with the same items as
    :class:`~densekit.data.cityscapes.CityscapesSegmentation` (``sem_seg`` holds class indices, 255 = ignore).

    Args:
        image_dir: Folder of images (searched recursively for ``image_suffix``, or every common image type).
        label_dir: Folder of label PNGs mirroring ``image_dir``; ``None`` for a split without labels.
        class_names: Name of each class index.
        ignore_index: Label value that marks unlabelled pixels in the files (mapped to 255 in ``sem_seg``).
        reduce_zero_label: ADE20K convention: 0 is ignored and class ``i`` is stored as ``i + 1``.
        image_suffix: File ending of images, e.g. ``".jpg"`` (None: any of :data:`IMAGE_SUFFIXES`).
        label_suffix: File ending of labels, replacing the image's (``"_labelTrainIds.png"`` style allowed).
        transform: As for Cityscapes (:func:`build_seg_train_transform` / :func:`build_seg_eval_transform`).
        exif: Decode images in the frame their EXIF orientation declares (``data.exif_orientation``); ``False``:
            the stored frame, for labels drawn on the raw pixel grid.
        unreadable: What an image or label that cannot be read does (``data.skip_unreadable``, see
            :func:`densekit.data.checks.unreadable_policy`): ``"raise"``, ``"skip"`` or ``"replace"``.
    """

    def __init__(
        self,
        image_dir: str | Path,
        label_dir: str | Path | None,
        class_names: Sequence[str],
        ignore_index: int = IGNORE_INDEX,
        reduce_zero_label: bool = False,
        image_suffix: str | None = None,
        label_suffix: str = ".png",
        transform: Transform | None = None,
        exif: bool = True,
        unreadable: str = "raise",
    ) -> None:
        self.exif = exif
        self.unreadable = unreadable
        self.image_dir = Path(image_dir).expanduser()
        self.label_dir = None if label_dir is None else Path(label_dir).expanduser()
        self.class_names = list(class_names)
        self.transform = transform
        self.has_labels = self.label_dir is not None
        self._suffix = label_suffix
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder {self.image_dir} does not exist")
        self._image_suffixes = (image_suffix.lower(),) if image_suffix else IMAGE_SUFFIXES
        images = sorted(p for p in self.image_dir.rglob("*") if p.is_file() and self._stem(p) is not None)
        if not images:
            raise FileNotFoundError(f"no images ({', '.join(self._image_suffixes)}) under {self.image_dir}")
        self._images = np.array([str(p) for p in images], dtype=str)  # shared pages in forked workers
        self._lut = self._value_table(ignore_index, reduce_zero_label)
        #: Class index -> the value written in this dataset's label files (predictions are written the same way).
        self.label_ids = np.array([np.flatnonzero(self._lut == c)[0] for c in range(self.num_classes)], np.uint8)
        if self.has_labels:
            if not self.label_dir.is_dir():
                raise FileNotFoundError(f"label folder {self.label_dir} does not exist")
            missing = [p for p in images if not self._label_of(p).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} of {len(images)} images under {self.image_dir} have no label: "
                    f"{self._label_of(missing[0])} (for {missing[0]}) does not exist"
                )

    def _value_table(self, ignore_index: int, reduce_zero_label: bool) -> np.ndarray:
        """``int16 [256]``: file value -> class index, 255 for ignore, -1 for values that must not occur."""
        lut = np.full(256, -1, dtype=np.int16)
        offset = 1 if reduce_zero_label else 0
        lut[offset : offset + self.num_classes] = np.arange(self.num_classes)
        if reduce_zero_label:
            lut[0] = IGNORE_INDEX
        if not 0 <= ignore_index < 256:
            raise ValueError(f"ignore_index {ignore_index} does not fit an 8-bit label PNG")
        if lut[ignore_index] >= 0 and lut[ignore_index] != IGNORE_INDEX:
            raise ValueError(f"ignore_index {ignore_index} is also a class value (classes are stored as "
                             f"{offset}..{offset + self.num_classes - 1})")
        lut[ignore_index] = IGNORE_INDEX
        return lut

    def _stem(self, image: Path) -> str | None:
        """The file name without its image ending (e.g. ``.jpg`` or ``_leftImg8bit.png``); None if not an image."""
        name = image.name.lower()
        ending = next((s for s in self._image_suffixes if name.endswith(s)), None)
        return None if ending is None else image.name[: -len(ending)]

    def _relative_stem(self, image: Path) -> Path:
        rel = image.relative_to(self.image_dir)
        return rel.parent / str(self._stem(image))

    def _label_of(self, image: Path) -> Path:
        return self.label_dir / f"{self._relative_stem(image)}{self._suffix}"

    def __len__(self) -> int:
        return len(self._images)

    def image_path(self, index: int) -> Path:
        return Path(str(self._images[index]))

    def label_path(self, index: int) -> Path | None:
        return None if self.label_dir is None else self._label_of(self.image_path(index))

    def load_label(self, index: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """The label of an image as class indices (``uint8 [H, W]``, 255 = ignore), validated."""
        path = self.label_path(index)
        if path is None:
            raise ValueError(f"{self} has no labels")
        raw = read_label(path)
        self.check_label_size(index, path, raw.shape, image_size)
        label = self._lut[raw]
        if (label < 0).any():
            values = np.unique(raw[label < 0])
            raise ValueError(f"label file {path} has values {values[:10].tolist()} that are neither classes "
                             f"({self.num_classes} of them: {self.class_names[:5]}...) nor the ignore value")
        return label.astype(np.uint8)

    def extra_target(self, index: int) -> dict[str, Any]:
        # Where its prediction PNG goes, relative to the output folder (sub-folders kept: names may repeat).
        return {"name": f"{self._relative_stem(self.image_path(index))}.png"}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_dir={str(self.image_dir)!r}, label_dir={str(self.label_dir)!r}, "
                f"images={len(self)}, classes={self.num_classes})")
