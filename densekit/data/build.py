"""Datasets and label maps from the ``data`` config group (conf/data/*.yaml)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .cityscapes import CityscapesSegmentation
from .coco import CocoDetection, coco_paths
from .seg_transforms import build_seg_eval_transform, build_seg_train_transform
from .synthetic import ensure_synthetic_coco, synthetic_coco_paths
from .synthetic_cityscapes import ensure_synthetic_cityscapes
from .transforms import build_eval_transform, build_train_transform

TASKS = {"coco": "detection", "cityscapes": "segmentation"}


def task_of(data_cfg: Any) -> str:
    """``detection`` or ``segmentation``, from ``data.format``."""
    if data_cfg.format not in TASKS:
        raise ValueError(f"data.format {data_cfg.format!r} is unknown; expected one of {sorted(TASKS)}")
    return TASKS[data_cfg.format]

COCO_ID_HEAD = 90  # the public EfficientDet checkpoints predict COCO category ids 1-90 as labels 0-89


def input_size(data_cfg: Any, model_cfg: Any) -> int:
    """Square training / evaluation resolution: ``data.image_size`` or else the model's."""
    if data_cfg.get("image_size"):
        return int(data_cfg.image_size)
    h, w = model_cfg.image_size
    if h != w:
        raise ValueError(f"model.image_size {list(model_cfg.image_size)} is not square; set data.image_size")
    return int(h)


def build_detection_dataset(data_cfg: Any, split: str, image_size: int, train: bool, pixel_mean: Any = None) -> CocoDetection:
    """A COCO-format dataset for ``split`` with the train or eval transform.

    The synthetic dataset is generated under ``data.root`` on first use when ``data.generate`` is set. Padding is
    filled with the model's ``pixel_mean`` (0-1 units), so padded pixels normalise to zero as the model's own do.
    """
    if data_cfg.format != "coco":
        raise ValueError(f"data.format {data_cfg.format!r} is not a detection format (expected 'coco')")
    root = Path(data_cfg.root)
    if data_cfg.get("generate", False):
        ensure_synthetic_coco(root, num_train=data_cfg.get("num_train", 400), num_val=data_cfg.get("num_val", 50))
        image_dir, ann_file = synthetic_coco_paths(root, split)
    else:
        image_dir, ann_file = coco_paths(root, split)
    aug = data_cfg.augment
    fill = {} if pixel_mean is None else {"fill": tuple(round(255 * m) for m in pixel_mean)}
    transform = (
        build_train_transform(image_size, scale_range=tuple(aug.scale_range), hflip=aug.hflip, color_jitter=aug.color_jitter, **fill)
        if train
        else build_eval_transform(image_size, **fill)
    )
    return CocoDetection(image_dir, ann_file, transform=transform, train=train)


def label_map_for_model(dataset: CocoDetection, num_classes: int) -> list[int]:
    """Model label -> dataset category id.

    A head trained on this dataset has one output per category (contiguous labels). A 90-class head (the public
    COCO checkpoints) predicts category ``id`` as label ``id - 1``. Anything else cannot be scored on this dataset.
    """
    if num_classes == dataset.num_classes:
        return list(dataset.label_to_cat_id)
    if num_classes == COCO_ID_HEAD and max(dataset.label_to_cat_id) <= COCO_ID_HEAD:
        return list(range(1, COCO_ID_HEAD + 1))
    raise ValueError(
        f"the model has {num_classes} classes but {dataset.ann_file} has {dataset.num_classes} categories "
        f"(ids {dataset.label_to_cat_id[:10]}...); train with model.num_classes={dataset.num_classes}"
    )


def build_segmentation_dataset(data_cfg: Any, split: str, train: bool, pixel_mean: Any = None) -> CityscapesSegmentation:
    """A Cityscapes-layout dataset for ``split``: random scale / crop / flip in training, full resolution in eval.

    The synthetic Cityscapes is generated under ``data.root`` on first use when ``data.generate`` is set.
    """
    if data_cfg.get("generate", False):
        ensure_synthetic_cityscapes(
            data_cfg.root, num_train=data_cfg.num_train, num_val=data_cfg.num_val, size=tuple(data_cfg.synthetic_size)
        )
    if train:
        aug = data_cfg.augment
        fill = {} if pixel_mean is None else {"fill": tuple(round(255 * m) for m in pixel_mean)}
        transform = build_seg_train_transform(
            crop_size=tuple(data_cfg.crop_size), scale_range=tuple(aug.scale_range), hflip=aug.hflip,
            color_jitter=aug.color_jitter, **fill,
        )
    else:
        size = data_cfg.get("eval_size")
        transform = build_seg_eval_transform(tuple(size) if size else None)
    return CityscapesSegmentation(data_cfg.root, split, transform=transform)
