"""Instance-weighted Cityscapes scores (iIoU): the per-instance statistics of cityscapesscripts' evaluation.

Pixel-level IoU lets a large car outweigh many small pedestrians; iIoU weights each ground-truth instance's
true-positive and false-negative pixels by ``average instance size of its class / its size`` (cityscapesscripts'
``evaluatePair``, with its table of average sizes), so that every instance counts about equally. False positives
stay unweighted (there is no instance to attach them to) and come from the confusion matrix.
:class:`~densekit.evaluation.cityscapes.CityscapesEvaluator` accumulates what :func:`instance_stats` returns.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from cityscapesscripts.helpers.labels import labels as CS_LABELS
from cityscapesscripts.helpers.labels import name2label

from ..data.cityscapes import TRAIN_ID_SUFFIX

INSTANCE_ID_SUFFIX = "_gtFine_instanceIds.png"

#: ``(labelId -> trainId of an evaluated class with instances, else -1; trainId -> category index; trainId ->
#: average instance size in pixels, 0 for classes without instances)``.
InstanceTables = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def instance_tables(class_names: Sequence[str], categories: Sequence[str]) -> InstanceTables:
    """The lookups :func:`instance_stats` needs, for the trainId classes ``class_names`` and ``categories``."""
    # The average instance sizes (Cityscapes train) that weight iIoU live in cityscapesscripts' settings object.
    from cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling import args as cs_args

    label_to_train = torch.full((max(lb.id for lb in CS_LABELS) + 1,), -1, dtype=torch.int64)
    avg_size = torch.zeros(len(class_names), dtype=torch.float64)
    for train_id, name in enumerate(class_names):
        label = name2label[name]
        if label.hasInstances and not label.ignoreInEval:
            label_to_train[label.id] = train_id
            avg_size[train_id] = cs_args.avgClassSize[name]
    train_to_category = torch.tensor([list(categories).index(name2label[n].category) for n in class_names])
    return label_to_train, train_to_category, avg_size


def instance_path(target: Mapping[str, Any]) -> Path | None:
    """The gtFine ``*_instanceIds.png`` beside a target's ``label_file`` (``*_labelTrainIds.png``), if it has one."""
    label_file = target.get("label_file")
    if label_file is None or not str(label_file).endswith(TRAIN_ID_SUFFIX):
        return None
    return Path(str(label_file)[: -len(TRAIN_ID_SUFFIX)] + INSTANCE_ID_SUFFIX)


def read_instances(target: Mapping[str, Any]) -> tuple[np.ndarray | None, Path | None]:
    """A target's instanceIds map (``None`` when the file does not exist) and its path.

    Raises:
        OSError: The file exists but is not a single-channel id image.
        ValueError: Its size differs from the target's ``sem_seg``.
    """
    path = instance_path(target)
    if path is None or not path.is_file():
        return None, path
    data = np.fromfile(path, dtype=np.uint8)
    instances = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if instances is None or instances.ndim != 2:
        raise OSError(f"cannot decode instance file {path} as a single-channel id image")
    if instances.shape != tuple(target["sem_seg"].shape[-2:]):
        raise ValueError(
            f"instance file {path} is {instances.shape[0]}x{instances.shape[1]} but its label is "
            f"{target['sem_seg'].shape[-2]}x{target['sem_seg'].shape[-1]}"
        )
    return instances, path


def instance_stats(pred: torch.Tensor, instances: np.ndarray, tables: InstanceTables, out: torch.Tensor) -> torch.Tensor:
    """Adds one image's weighted true positives / false negatives per class and per category to ``out``.

    Args:
        pred: Predicted trainIds at the instance map's size ``[H, W]``.
        instances: gtFine instanceIds ``[H, W]``: ``labelId * 1000 + k`` on instances, the labelId elsewhere.
        tables: :func:`instance_tables`.
        out: float64 ``[2, C + K + ...]``: row 0 weighted true positives, row 1 weighted false negatives, columns
            the ``C`` classes then the ``K`` categories.

    Returns:
        ``out``.
    """
    label_to_train, train_to_cat, avg_size = tables
    num_classes = len(avg_size)
    inst = torch.from_numpy(instances.astype(np.int64))
    selected = inst > 1000  # instance pixels, selected as cityscapesscripts does
    ids, p = inst[selected], pred.cpu()[selected]
    if ids.numel() == 0:
        return out
    uniq, inverse = torch.unique(ids, return_inverse=True)
    label_ids = (uniq // 1000).clamp(max=len(label_to_train) - 1)
    train = torch.where(uniq // 1000 < len(label_to_train), label_to_train[label_ids], -1)
    pixel_train = train[inverse]
    sizes = torch.bincount(inverse, minlength=len(uniq)).double()
    # Per instance: pixels predicted as its class, and as any class of its category.
    tp = torch.bincount(inverse, weights=(p == pixel_train).double(), minlength=len(uniq))
    same_category = train_to_cat[p] == train_to_cat[pixel_train.clamp(min=0)]
    cat_tp = torch.bincount(inverse, weights=same_category.double(), minlength=len(uniq))
    keep = train >= 0  # instances of evaluated classes (caravan and trailer are not)
    train, sizes, tp, cat_tp = train[keep], sizes[keep], tp[keep], cat_tp[keep]
    weight = avg_size[train] / sizes
    category = num_classes + train_to_cat[train]
    out[0].index_add_(0, train, tp * weight)
    out[1].index_add_(0, train, (sizes - tp) * weight)
    out[0].index_add_(0, category, cat_tp * weight)
    out[1].index_add_(0, category, (sizes - cat_tp) * weight)
    return out
