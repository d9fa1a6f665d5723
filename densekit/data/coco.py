"""COCO-format detection dataset with up-front validation of the annotation file.

Everything that can be checked without decoding images is checked when the dataset is built, so a bad annotation
file fails at startup with its path (and the offending annotation id) instead of hours into training. Boxes are
converted once into flat arrays; ``__getitem__`` only slices them.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from ..labels import CROWD_LABEL
from .checks import DatasetFiles, ImageProblem, exif_frame_hint, placeholder_item, read_item
from .decode import check_decoder, decode_file
from .transforms import TransformOutput, image_to_tensor

log = logging.getLogger(__name__)

DATASETS_ENV = "DENSEKIT_DATASETS"

_COCO_SPLITS = {
    "train": ("train2017", "annotations/instances_train2017.json"),
    "val": ("val2017", "annotations/instances_val2017.json"),
    "test-dev": ("test2017", "annotations/image_info_test-dev2017.json"),
}

Transform = Callable[[np.ndarray, np.ndarray, np.ndarray], TransformOutput]


def datasets_root() -> Path:
    """``$DENSEKIT_DATASETS``, or ``./datasets`` when unset."""
    return Path(os.environ.get(DATASETS_ENV) or "datasets")


def coco_paths(root: str | Path | None = None, split: str = "train") -> tuple[Path, Path]:
    """Image folder and annotation file of a COCO 2017 split in the official layout.

    Args:
        root: The ``coco`` folder; defaults to ``$DENSEKIT_DATASETS/coco``.
        split: ``"train"``, ``"val"`` or ``"test-dev"`` (image info only: build its dataset with ``train=False``).

    Returns:
        ``(image_dir, ann_file)``. Only ``root`` is checked here; :class:`CocoDetection` checks the rest.
    """
    if split not in _COCO_SPLITS:
        raise ValueError(f"unknown COCO split {split!r}; expected one of {sorted(_COCO_SPLITS)}")
    root = Path(root) if root is not None else datasets_root() / "coco"
    if not root.is_dir():
        raise FileNotFoundError(
            f"COCO root {root} does not exist. Place COCO 2017 there in the official layout described in "
            f"datasets/README.md (train2017/, val2017/, test2017/, annotations/), or set {DATASETS_ENV} to the "
            f"folder that contains coco/."
        )
    image_dir, ann_file = _COCO_SPLITS[split]
    return root / image_dir, root / ann_file


def _load_json(ann_file: Path) -> dict[str, Any]:
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file {ann_file} does not exist")
    if ann_file.stat().st_size == 0:
        raise ValueError(f"annotation file {ann_file} is empty")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"annotation file {ann_file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {ann_file}: expected a JSON object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"annotation file {ann_file}: missing or malformed {key!r} list (not COCO format?)")
    if "annotations" in data and not isinstance(data["annotations"], list):
        raise ValueError(f"annotation file {ann_file}: 'annotations' must be a list")
    return data


def _column(records: list[dict], key: str, dtype: Any, ann_file: Path, what: str, shape: tuple = ()) -> np.ndarray:
    """One field of every record as an array; only when that fails are records scanned to name the bad one."""
    values = [r.get(key) if isinstance(r, dict) else None for r in records]
    try:
        out = np.asarray(values, dtype=dtype)
        if out.shape == (len(records), *shape) and (out.dtype.kind != "f" or np.isfinite(out).all()):
            return out.reshape(len(records), *shape)
    except (TypeError, ValueError):
        pass
    for i, (r, v) in enumerate(zip(records, values)):
        try:
            ok = np.asarray(v, dtype=dtype).shape == shape and (np.dtype(dtype).kind != "f" or np.isfinite(v).all())
        except (TypeError, ValueError):
            ok = False
        if not ok:
            rid = r.get("id", f"#{i}") if isinstance(r, dict) else f"#{i}"
            raise ValueError(f"annotation file {ann_file}: {what} {rid} has a missing or malformed {key!r}: {v!r}")
    raise ValueError(f"annotation file {ann_file}: malformed {key!r} in {what}s")  # pragma: no cover


def _lookup(sorted_ids: Sequence[int], query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``query`` ids in the sorted ``sorted_ids`` (vectorised), and a mask of ids not found there."""
    known = np.asarray(sorted_ids, dtype=np.int64)
    if len(known) == 0:
        return np.zeros(len(query), np.int64), np.ones(len(query), bool)
    index = np.searchsorted(known, query).clip(max=len(known) - 1)
    return index, known[index] != query


def _fix_ground_truth(anns: list[dict], keep: np.ndarray, partly: np.ndarray, clipped: np.ndarray) -> None:
    """Make the evaluation ground truth (``anns``, in place) the boxes training uses: dropped boxes removed, partly
    outside ones clipped (``bbox``) with ``area`` capped at the clipped box's area.

    ``area`` is what COCOeval sorts ground truth into small / medium / large by. It is the box area in converted
    datasets (then it becomes the clipped box's area) and the mask area in COCO's own files (a mask lies inside its
    image, so the cap leaves it as it is, or nearly).
    """
    for i in np.flatnonzero(partly):
        x0, y0, x1, y1 = (float(v) for v in clipped[i])
        ann = anns[i]
        ann["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        if isinstance(ann.get("area"), (int, float)):
            ann["area"] = min(float(ann["area"]), (x1 - x0) * (y1 - y0))
    if not keep.all():
        anns[:] = [a for a, k in zip(anns, keep.tolist()) if k]


class CocoDetection(Dataset):
    """A COCO-format detection dataset returning ``(image, target)`` pairs for :class:`EfficientDet`.

    Category ids (1-90 with gaps in COCO) map to contiguous labels in sorted-id order; images without boxes are
    kept (they are negatives in training and count in evaluation). Crowd boxes get label
    :data:`~densekit.labels.CROWD_LABEL` (-2) in training (the loss ignores anchors on them) and are dropped in
    evaluation, where COCOeval reads them from :attr:`coco`.

    Args:
        image_dir: Folder holding the images named by ``file_name``.
        ann_file: COCO json; one with no ``annotations`` (e.g. test-dev image info) gives zero boxes everywhere.
        transform: ``(image, boxes, labels) -> (image, boxes, labels, scale, size)``, e.g.
            :func:`build_train_transform`; ``None`` returns the image as-is with ``scale=1``.
        train: Keep crowd boxes as ignore regions instead of dropping them.
        unreadable: What an image that cannot be decoded does: ``"raise"`` its ``OSError``, ``"skip"`` it (a
            placeholder item the evaluation leaves out) or ``"replace"`` it with the next image (training); see
            :func:`densekit.data.checks.unreadable_policy` (``data.skip_unreadable``).

    Attributes:
        coco: The pycocotools ``COCO`` object of the evaluation ground truth: the json's annotations (crowd ones
            included) with the boxes training uses, i.e. zero-area boxes and boxes wholly outside their image
            removed and boxes partly outside clipped to it (``area`` capped at the clipped box's), so COCOeval never
            scores against a box training silently changed. The load logs one warning with the counts.
        box_fixes: How many annotations were dropped as ``zero_area`` or ``outside`` and how many ``clipped``.
        image_ids: COCO image id of each index, sorted.
        cat_ids / label_to_cat_id: COCO category id of each label.
        cat_id_to_label: The inverse mapping.
        class_names: Category name of each label.
    """

    def __init__(
        self, image_dir: str | Path, ann_file: str | Path, transform: Transform | None = None, train: bool = True,
        decoder: str = "opencv", exif: bool = True, unreadable: str = "raise",
    ) -> None:
        self.image_dir = Path(image_dir)
        self.exif = exif  # decode in the orientation EXIF declares (the displayed frame), as the boxes are drawn
        self.ann_file = Path(ann_file)
        self.transform = transform
        self.train = train
        self.unreadable = unreadable
        check_decoder(decoder)  # at construction: a typo fails before any worker starts
        self.decoder = decoder
        data = _load_json(self.ann_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder {self.image_dir} (for {self.ann_file}) does not exist")
        self.has_annotations = "annotations" in data
        if train and not self.has_annotations:
            raise ValueError(
                f"annotation file {self.ann_file} has no 'annotations' (image info only, like test-dev): "
                "it cannot be used for training; build the dataset with train=False"
            )
        data.setdefault("annotations", [])  # COCOeval / loadRes expect the key

        self._parse_categories(data["categories"])
        self._parse_images(data["images"])
        self._parse_annotations(data["annotations"])

        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    @property
    def label_to_cat_id(self) -> list[int]:
        return self.cat_ids

    def _parse_categories(self, cats: list[dict]) -> None:
        ids = _column(cats, "id", np.int64, self.ann_file, "category")
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"annotation file {self.ann_file}: duplicate category ids")
        order = np.argsort(ids, kind="stable")
        self.cat_ids: list[int] = ids[order].tolist()
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.cat_ids)}
        self.class_names: list[str] = [str(cats[i].get("name", self.cat_ids[k])) for k, i in enumerate(order)]

    def _parse_images(self, images: list[dict]) -> None:
        ids = _column(images, "id", np.int64, self.ann_file, "image")
        sizes = np.stack(
            [_column(images, k, np.int64, self.ann_file, "image") for k in ("height", "width")], 1
        )
        bad_names = [im.get("id", f"#{i}") for i, im in enumerate(images) if not isinstance(im.get("file_name"), str)]
        if bad_names:
            raise ValueError(f"annotation file {self.ann_file}: images {bad_names[:5]} have no 'file_name'")
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"annotation file {self.ann_file}: duplicate image ids")
        if (sizes <= 0).any():
            bad = ids[(sizes <= 0).any(1)][:5].tolist()
            raise ValueError(f"annotation file {self.ann_file}: images {bad} have a non-positive width/height")
        order = np.argsort(ids, kind="stable")
        self.image_ids: list[int] = ids[order].tolist()
        # A numpy string array, not a list of str: reading list items in forked DataLoader workers bumps their
        # refcounts, which copies the parent's memory pages into every worker over an epoch.
        self._file_names = np.array([images[i]["file_name"] for i in order], dtype=str)
        self._sizes = sizes[order]  # [N, 2] (H, W) from the json, checked against the decoded image

    def _parse_annotations(self, anns: list[dict]) -> None:
        n = len(anns)
        ann_ids = _column(anns, "id", np.int64, self.ann_file, "annotation") if n else np.zeros(0, np.int64)
        if n:
            img_ids = _column(anns, "image_id", np.int64, self.ann_file, "annotation")
            cat_ids = _column(anns, "category_id", np.int64, self.ann_file, "annotation")
            xywh = _column(anns, "bbox", np.float64, self.ann_file, "annotation", shape=(4,))
            crowd = np.asarray([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        else:
            img_ids = cat_ids = np.zeros(0, np.int64)
            xywh, crowd = np.zeros((0, 4)), np.zeros(0, bool)

        img_index, bad = _lookup(self.image_ids, img_ids)
        if bad.any():
            raise ValueError(
                f"annotation file {self.ann_file}: annotations {ann_ids[bad][:5].tolist()} refer to unknown image "
                f"ids {np.unique(img_ids[bad])[:5].tolist()}"
            )
        label, bad = _lookup(self.cat_ids, cat_ids)
        if bad.any():
            raise ValueError(
                f"annotation file {self.ann_file}: annotations {ann_ids[bad][:5].tolist()} have category ids "
                f"{np.unique(cat_ids[bad])[:5].tolist()} not listed in 'categories' (known: {self.cat_ids})"
            )

        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        hw = self._sizes[img_index].astype(np.float64)
        limits = np.concatenate([hw[:, ::-1], hw[:, ::-1]], 1)  # (W, H, W, H)
        clipped = np.clip(boxes, 0.0, limits)
        degenerate = (xywh[:, 2] <= 0) | (xywh[:, 3] <= 0)
        outside = ~degenerate & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
        partly = ~degenerate & ~outside & (clipped != boxes).any(1)
        keep = ~degenerate & ~outside
        if degenerate.any() or outside.any() or partly.any():
            examples = ann_ids[degenerate | outside | partly][:5].tolist()
            log.warning(
                "%s: dropped %d zero-area boxes and %d boxes entirely outside their image, clipped %d boxes partly "
                "outside their image (of %d; e.g. annotation ids %s); the evaluation ground truth is cleaned the "
                "same way",
                self.ann_file, degenerate.sum(), outside.sum(), partly.sum(), n, examples,
            )
            _fix_ground_truth(anns, keep, partly, clipped)
        self.box_fixes = {"zero_area": int(degenerate.sum()), "outside": int(outside.sum()),
                          "clipped": int(partly.sum())}
        labels = np.where(crowd, CROWD_LABEL, label)
        if not self.train:
            keep &= ~crowd

        img_index, clipped, labels = img_index[keep], clipped[keep], labels[keep]
        order = np.argsort(img_index, kind="stable")
        self._boxes = clipped[order].astype(np.float32)
        self._labels = labels[order].astype(np.int64)
        # Annotations of image i are rows _starts[i]:_starts[i + 1].
        self._starts = np.searchsorted(img_index[order], np.arange(len(self.image_ids) + 1))

    def __len__(self) -> int:
        return len(self.image_ids)

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Validated boxes (``[M, 4]`` xyxy, original pixels) and labels of an image, without decoding it."""
        s, e = self._starts[index], self._starts[index + 1]
        return self._boxes[s:e].copy(), self._labels[s:e].copy()

    def image_path(self, index: int) -> Path:
        return self.image_dir / str(self._file_names[index])

    def size_error(self, index: int, size: tuple[int, int]) -> str | None:
        """Why an image of ``size`` ``(H, W)`` (decoded, or read from its header in the same frame) cannot be image
        ``index``: another size in the json, naming EXIF when the json has the photo's other frame; ``None``: it
        fits."""
        expected = tuple(int(v) for v in self._sizes[index])
        if tuple(size) == expected:
            return None
        # The json has the photo's other frame (stored vs. displayed): say which, and the switch.
        rotated = tuple(size) == expected[::-1]
        exif = exif_frame_hint(self.exif, "the json describes", "the boxes were") if rotated else ""
        return (
            f"image file {self.image_path(index)} is {size[0]}x{size[1]} (HxW) but {self.ann_file} says "
            f"{expected[0]}x{expected[1]} for image id {self.image_ids[index]}; its boxes would be wrong" + exif
        )

    def listed_files(self, name: str) -> DatasetFiles:
        """The images of this dataset for the check before training (:func:`densekit.data.checks.check_images`),
        with the json's sizes to hold their headers to."""
        def check(index: int, size: tuple[int, int]) -> ImageProblem | None:
            message = self.size_error(index, size)
            return None if message is None else ImageProblem(self.image_path(index), message, unreadable=False)

        return DatasetFiles(name, [self.image_path(i) for i in range(len(self))], self.exif, check)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return read_item(self._load, index, len(self), self.unreadable, self._placeholder)

    def _placeholder(self, index: int, error: OSError) -> tuple[torch.Tensor, dict[str, Any]]:
        return placeholder_item(error, file=str(self.image_path(index)), image_id=int(self.image_ids[index]))

    def _load(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        path = self.image_path(index)
        image_id = self.image_ids[index]
        try:
            image = decode_file(path, self.decoder, exif=self.exif)
        except OSError as e:  # FileNotFoundError included; re-raised with the dataset context, same type
            raise type(e)(f"{e} (image id {image_id} in {self.ann_file})") from None
        orig_size = (int(image.shape[0]), int(image.shape[1]))
        message = self.size_error(index, orig_size)
        if message is not None:
            raise ValueError(message)
        boxes, labels = self.annotations(index)
        if self.transform is not None:
            tensor, boxes, labels, scale, size = self.transform(image, boxes, labels)
        else:
            tensor, scale, size = image_to_tensor(image), 1.0, orig_size
        target = {
            "boxes": torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)),
            "image_id": int(image_id),
            "scale": float(scale),
            "orig_size": orig_size,
            "size": (int(size[0]), int(size[1])),
        }
        return tensor, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ann_file={str(self.ann_file)!r}, images={len(self)}, boxes={len(self._boxes)}, "
            f"classes={self.num_classes}, train={self.train})"
        )
