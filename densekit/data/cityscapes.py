"""Cityscapes semantic segmentation in the official layout, with trainIds made by cityscapesscripts.

File pairing is checked when the dataset is built, so a missing or unconverted label fails at startup with its
path; what needs decoding (sizes, label values) is checked per item, again naming the file.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from cityscapesscripts.helpers.labels import Label
from cityscapesscripts.helpers.labels import labels as CS_LABELS

from .coco import DATASETS_ENV, datasets_root
from .seg_dataset import SegmentationDataset, Transform
from .seg_transforms import IGNORE_INDEX

__all__ = [
    "CITYSCAPES_CLASSES",
    "NUM_CLASSES",
    "TRAIN_LABELS",
    "CityscapesSegmentation",
    "cityscapes_root",
    "label_id_to_train_id",
    "read_label",
]

SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_ID_SUFFIX = "_gtFine_labelIds.png"

#: The 19 evaluated classes' cityscapesscripts labels (name, id, trainId, category, colour...), by trainId: densekit's
#: one Cityscapes class table, read by the dataset and the evaluation (cityscapesscripts is the source of truth).
TRAIN_LABELS: tuple[Label, ...] = tuple(
    sorted((lb for lb in CS_LABELS if 0 <= lb.trainId < IGNORE_INDEX), key=lambda lb: lb.trainId)
)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(lb.name for lb in TRAIN_LABELS)
NUM_CLASSES = len(CITYSCAPES_CLASSES)

# Values a labelTrainIds file may hold.
_VALID_TRAIN_ID = np.zeros(256, dtype=bool)
_VALID_TRAIN_ID[list(range(NUM_CLASSES)) + [IGNORE_INDEX]] = True


def label_id_to_train_id() -> np.ndarray:
    """``uint8 [256]`` lookup table labelId -> trainId from cityscapesscripts (unknown ids and -1 -> 255)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for lb in CS_LABELS:
        if 0 <= lb.id < 256:
            lut[lb.id] = lb.trainId if 0 <= lb.trainId < 256 else IGNORE_INDEX
    return lut


def cityscapes_root(root: str | Path | None = None) -> Path:
    """The Cityscapes folder (``$DENSEKIT_DATASETS/cityscapes`` by default), checked to exist.

    Raises:
        FileNotFoundError: It does not exist; the message says where the data goes.
    """
    root = Path(root) if root is not None else datasets_root() / "cityscapes"
    if not root.is_dir():
        raise FileNotFoundError(
            f"Cityscapes root {root} does not exist. Place Cityscapes there in the official layout described in "
            f"datasets/README.md (leftImg8bit/, gtFine/ with labelTrainIds made by csCreateTrainIdLabelImgs), or "
            f"set {DATASETS_ENV} to the folder that contains cityscapes/."
        )
    return root


def _is_palette_png(data: np.ndarray) -> bool:
    """Whether the bytes are a PNG of colour type 3 (palette), read from the IHDR chunk."""
    return data.size > 25 and data[:8].tobytes() == b"\x89PNG\r\n\x1a\n" and int(data[25]) == 3


def read_label(path: str | Path) -> np.ndarray:
    """Decode a single-channel 8-bit label PNG to ``uint8 [H, W]``.

    A palette PNG (mode ``"P"``, the Pascal VOC ``SegmentationClass`` format) reads as its palette indices, which
    are the class ids (VOC: 0 background, 1-20 the classes, 255 the ignored boundary), not as the colours shown.

    Raises:
        FileNotFoundError: The file does not exist.
        OSError: It cannot be decoded, or is not a single-channel 8-bit image (e.g. a colour visualisation).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file {path} does not exist")
    data = np.fromfile(path, dtype=np.uint8)
    label = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if label is not None and _is_palette_png(data):
        # A palette PNG (Pascal VOC SegmentationClass): the palette index is the class; OpenCV expands it to colours.
        from PIL import Image

        with Image.open(path) as im:
            label = np.array(im) if im.mode == "P" else label
    if label is None:
        raise OSError(f"cannot decode label file {path} ({data.size} bytes): not a readable image")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise OSError(
            f"label file {path} is {label.dtype} with shape {list(label.shape)}; expected a single-channel 8-bit "
            "id image or a palette PNG whose indices are the classes (not an RGB colour visualisation such as "
            "Cityscapes' *_color.png)"
        )
    return label


class CityscapesSegmentation(SegmentationDataset):

    """Cityscapes images with their gtFine trainId labels.

    Layout: ``root/leftImg8bit/{split}/<city>/<name>_leftImg8bit.png`` and
    ``root/gtFine/{split}/<city>/<name>_gtFine_labelTrainIds.png``. Images are sorted by path.

    Items are ``(image, target)``: ``image`` float ``[3, H, W]`` in [0, 1] after the transform, ``target`` a dict
    with ``sem_seg`` (int64 ``[H, W]`` trainIds 0-18, 255 = ignore; ``None`` for the test split), ``file`` (image
    path), ``label_file`` (``None`` for test), ``orig_size`` ``(H, W)`` of the stored image and ``size`` ``(h, w)``
    of the returned image.

    Args:
        root: The ``cityscapes`` folder; defaults to ``$DENSEKIT_DATASETS/cityscapes``.
        split: ``"train"``, ``"val"`` or ``"test"`` (no labels are read for test).
        transform: ``(image uint8 [H, W, 3], label uint8 [H, W] or None) -> (tensor, label tensor or None)``,
            e.g. :func:`build_seg_train_transform`; ``None`` returns the full-resolution image as-is.
        exif: Decode images in the frame their EXIF orientation declares (``data.exif_orientation``); ``False``:
            the stored frame.
        unreadable: What an image or label that cannot be read does (``data.skip_unreadable``, see
            :func:`densekit.data.checks.unreadable_policy`): ``"raise"``, ``"skip"`` or ``"replace"``.

    Raises:
        FileNotFoundError: Missing root, split folder, images, or a gtFine label of some image.
        ValueError: Unknown split.
    """

    #: The 19 evaluated classes, by trainId.
    class_names: tuple[str, ...] = CITYSCAPES_CLASSES
    #: trainId -> labelId: how predictions are written (the format of cityscapesscripts and the benchmark server).
    label_ids: np.ndarray = np.array([lb.id for lb in TRAIN_LABELS], dtype=np.uint8)

    def __init__(
        self, root: str | Path | None = None, split: str = "train", transform: Transform | None = None,
        exif: bool = True, unreadable: str = "raise",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown Cityscapes split {split!r}; expected one of {SPLITS}")
        self.root = cityscapes_root(root)
        self.split = split
        self.transform = transform
        self.exif = exif
        self.unreadable = unreadable
        self.has_labels = split != "test"
        image_dir = self.root / "leftImg8bit" / split
        if not image_dir.is_dir():
            raise FileNotFoundError(f"Cityscapes image folder {image_dir} does not exist (see datasets/README.md)")
        images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not images:
            raise FileNotFoundError(f"no *{IMAGE_SUFFIX} images under {image_dir}/<city>/ (see datasets/README.md)")
        # Numpy string arrays rather than lists of str: forked DataLoader workers then share the pages.
        self._images = np.array([str(p) for p in images], dtype=str)
        self._labels = np.array([str(self._label_path(p)) for p in images], dtype=str) if self.has_labels else None
        if self._labels is not None:
            self._check_labels_exist(images)

    def _label_path(self, image: Path, suffix: str = TRAIN_ID_SUFFIX) -> Path:
        name = image.name[: -len(IMAGE_SUFFIX)]
        return self.root / "gtFine" / self.split / image.parent.name / f"{name}{suffix}"

    def _check_labels_exist(self, images: list[Path]) -> None:
        missing = [i for i, p in enumerate(self._labels) if not Path(p).is_file()]
        if not missing:
            return
        first = images[missing[0]]
        if self._label_path(first, LABEL_ID_SUFFIX).is_file():
            raise FileNotFoundError(
                f"{len(missing)} of {len(images)} {self.split} images have no gtFine trainId label, e.g. "
                f"{self._labels[missing[0]]}, but the labelIds files exist: create the trainId labels with "
                f"cityscapesscripts: CITYSCAPES_DATASET={self.root} csCreateTrainIdLabelImgs (see datasets/README.md)"
            )
        raise FileNotFoundError(
            f"{len(missing)} of {len(images)} {self.split} images have no gtFine label: {self._labels[missing[0]]} "
            f"(for image {first}) does not exist"
        )

    def __len__(self) -> int:
        return len(self._images)

    def image_path(self, index: int) -> Path:
        return Path(str(self._images[index]))

    def label_path(self, index: int) -> Path | None:
        return None if self._labels is None else Path(str(self._labels[index]))

    def load_label(self, index: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """The validated trainId label of an image, ``uint8 [H, W]``.

        Args:
            index: Dataset index.
            image_size: ``(H, W)`` the label must have (its image's), checked when given.

        Raises:
            OSError: Missing or undecodable label file.
            ValueError: Wrong size, or values other than trainIds 0-18 and 255.
        """
        path = self.label_path(index)
        if path is None:
            raise ValueError(f"the {self.split} split has no labels")
        label = read_label(path)
        self.check_label_size(index, path, label.shape, image_size)
        bad = ~_VALID_TRAIN_ID[label]
        if bad.any():
            values = np.unique(label[bad])
            hint = ""
            if values.max() < 34:  # all within the labelId range
                hint = " (it looks like a labelIds file: trainIds come from csCreateTrainIdLabelImgs)"
            raise ValueError(
                f"label file {path} has {int(bad.sum())} pixels with values {values[:10].tolist()} that are not "
                f"trainIds 0-{NUM_CLASSES - 1} or {IGNORE_INDEX}{hint}"
            )
        return label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, images={len(self)})"
