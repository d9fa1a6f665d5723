"""Cityscapes semantic segmentation evaluation: a trainId confusion matrix that reproduces the official IoUs.

:class:`CityscapesEvaluator` scores predictions against the trainId labels (255 ignored). Its class IoUs equal
those of cityscapesscripts' ``evalPixelLevelSemanticLabeling`` run on the same predictions written as labelId PNGs
by :func:`write_predictions`: the official confusion matrix over labelIds, restricted to the 19 evaluated classes,
is this one, and pixels whose ground truth is ignored in evaluation are skipped by both. Category IoUs and the
instance-weighted iIoU scores (:mod:`densekit.evaluation.cityscapes_instances`) follow the same script.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..checkpoint.io import atomic_write
from ..data.cityscapes import CITYSCAPES_CLASSES, NUM_CLASSES, TRAIN_LABELS
from ..data.seg_transforms import IGNORE_INDEX
from .cityscapes_instances import instance_stats, instance_tables, read_instances
from .table import per_class_columns

log = logging.getLogger(__name__)

__all__ = [
    "CITYSCAPES_CATEGORIES",
    "CityscapesEvaluator",
    "colorize",
    "format_cityscapes_table",
    "train_id_to_label_id",
    "write_predictions",
]

# The 7 evaluated categories (flat, construction, object, nature, sky, human, vehicle) and their trainIds, in
# cityscapesscripts' order; "void" holds no evaluated class.
CITYSCAPES_CATEGORIES: dict[str, list[int]] = {}
for _lb in TRAIN_LABELS:
    CITYSCAPES_CATEGORIES.setdefault(_lb.category, []).append(_lb.trainId)


def train_id_to_label_id() -> np.ndarray:
    """``uint8 [256]`` lookup table trainId -> labelId from cityscapesscripts; anything else -> 0 (unlabeled)."""
    lut = np.zeros(256, dtype=np.uint8)
    for lb in TRAIN_LABELS:
        lut[lb.trainId] = lb.id
    return lut


def _color_lut() -> np.ndarray:
    """Cityscapes' official colours for trainIds 0-18; well-separated hues for the classes of other datasets
    (19-254); ignore (255) black, like 'unlabeled'."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    hues = (np.arange(256) * 47) % 180
    hsv = np.stack([hues, np.full(256, 200), np.where(np.arange(256) % 2, 255, 170)], 1).astype(np.uint8)
    lut[:] = cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]
    lut[IGNORE_INDEX] = 0
    for lb in TRAIN_LABELS:
        lut[lb.trainId] = lb.color
    return lut


_TRAIN_TO_LABEL = train_id_to_label_id()
_COLORS = _color_lut()


def _to_numpy(label_map: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(label_map, torch.Tensor):
        return label_map.detach().cpu().numpy()
    return np.asarray(label_map)


def colorize(train_id_map: torch.Tensor | np.ndarray) -> np.ndarray:
    """Official Cityscapes colours of a trainId map.

    Args:
        train_id_map: ``[H, W]`` integer trainIds (255 and any other id outside 0-18 are drawn black).

    Returns:
        ``uint8 [H, W, 3]`` RGB.
    """
    ids = _to_numpy(train_id_map).astype(np.int64)
    return _COLORS[np.where((ids >= 0) & (ids < 256), ids, 255)]


def _resize_nearest(label_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of an ``[h, w]`` integer map, pixel-centre aligned ("nearest-exact", as the data transforms)."""
    if tuple(label_map.shape[-2:]) == tuple(size):
        return label_map
    # float32 represents every class id exactly; interpolate needs a float batch.
    out = F.interpolate(label_map[None, None].float(), size=tuple(size), mode="nearest-exact")
    return out[0, 0].to(label_map.dtype)


def write_predictions(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    targets: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    label_ids: np.ndarray | None = None,
) -> list[Path]:
    """Writes predictions as label PNGs in the dataset's own encoding: by default the labelId PNGs that
    cityscapesscripts' evaluation (and the benchmark server) read.

    Each prediction is upsampled (nearest) to its image's original size, mapped class -> stored value (Cityscapes:
    trainId -> labelId with cityscapesscripts' table), and written atomically as ``out_dir/<target["name"]>``, by
    default the image's file name (e.g. ``frankfurt_000000_000294_leftImg8bit.png``), which
    ``evalPixelLevelSemanticLabeling`` matches to its ground truth by the ``<city>_<sequence>_<frame>`` prefix.

    Args:
        outputs: Per image ``{"sem_seg": int [h, w] class indices}`` (model-input resolution is fine).
        targets: Per image, ``file`` (the image path), ``orig_size`` ``(H, W)`` and optionally ``name``.
        out_dir: Destination folder; created if missing.
        label_ids: Class index -> value written (a dataset's ``label_ids``); None: Cityscapes' trainId -> labelId.

    Returns:
        The written paths.

    Raises:
        ValueError: Mismatched lengths or a prediction outside trainIds 0-18.
    """
    if len(outputs) != len(targets):
        raise ValueError(f"{len(outputs)} outputs but {len(targets)} targets")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    lut = _TRAIN_TO_LABEL[:NUM_CLASSES] if label_ids is None else np.asarray(label_ids, dtype=np.uint8)
    for output, target in zip(outputs, targets):
        pred = output["sem_seg"].detach().cpu()
        if pred.numel() and (pred.min() < 0 or pred.max() >= len(lut)):
            raise ValueError(
                f"prediction for {target['file']} has values {pred.min().item()}..{pred.max().item()}; "
                f"expected classes 0-{len(lut) - 1}"
            )
        size = tuple(int(v) for v in target["orig_size"])
        stored = lut[_resize_nearest(pred, size).numpy().astype(np.intp)]
        ok, encoded = cv2.imencode(".png", stored)
        if not ok:  # pragma: no cover
            raise OSError(f"could not encode the prediction for {target['file']}")
        path = out_dir / str(target.get("name") or Path(str(target["file"])).name)
        with atomic_write(path) as f:
            f.write(encoded.tobytes())
        paths.append(path)
    return paths


class CityscapesEvaluator:
    """Accumulates a trainId confusion matrix (rows: ground truth, columns: prediction) over an evaluation loop.

    Predictions at a lower resolution than their label (e.g. a resized model input) are upsampled to it with
    nearest-neighbour interpolation first. Targets holding a ``file`` are counted once per file: seeing a file
    again (e.g. the duplicates ``DistributedSampler`` pads the last batch with) replaces its counts.

    With ``instance_level`` (the 19 Cityscapes classes only), a target's ``label_file`` leads to its gtFine
    ``*_instanceIds.png``, and the instance-weighted scores of cityscapesscripts (iIoU) are computed too: each
    ground-truth instance's true-positive and false-negative pixels are weighted by the class's average instance
    size over the instance's size, so that small objects count as much as large ones. They are reported only when
    every evaluated image had its instance file.

    Args:
        num_classes: Number of trainIds scored (19 for Cityscapes).
        ignore_index: Label value skipped.
        class_names: Name per trainId; cityscapesscripts' names by default (required if ``num_classes != 19``).
        instance_level: Also compute iIoU from the gtFine instance files next to the labels.
    """

    def __init__(
        self,
        num_classes: int = 19,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        instance_level: bool = True,
    ) -> None:
        if class_names is None:
            if num_classes != NUM_CLASSES:
                raise ValueError(f"give class_names for num_classes={num_classes} (Cityscapes has 19)")
            class_names = CITYSCAPES_CLASSES
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names)
        self.is_cityscapes = self.class_names == list(CITYSCAPES_CLASSES)
        self.instance_level = instance_level and self.is_cityscapes
        self._tables = instance_tables(CITYSCAPES_CLASSES, list(CITYSCAPES_CATEGORIES)) if self.instance_level else None
        self.reset()

    def reset(self) -> None:
        """Forgets everything accumulated."""
        # Per file: (confusion, instance statistics); the instance statistics are float64 [2, C + K + 1]: weighted
        # true positives (row 0) and false negatives (row 1) per class, then per category, then in [0, -1] the
        # number of images that had no instance file.
        self._per_file: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._unnamed = (torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64), self._empty_instances())
        self._total: tuple[torch.Tensor, torch.Tensor] | None = None  # the all-rank sums, set by synchronize()
        self._missing_logged = False

    def _empty_instances(self) -> torch.Tensor:
        """Zeroed instance statistics: the layout :func:`instance_stats` fills."""
        return torch.zeros(2, self.num_classes + len(CITYSCAPES_CATEGORIES) + 1, dtype=torch.float64)

    def confusion(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """``int64 [C, C]`` confusion matrix of one ``[h, w]`` prediction against an ``[H, W]`` label."""
        c = self.num_classes
        # On the prediction's device: upsampling and counting full-resolution maps is cheap there on a GPU.
        pred = _resize_nearest(pred.detach().long(), tuple(gt.shape[-2:]))
        gt = gt.detach().to(pred.device, torch.int64)
        valid = gt != self.ignore_index
        gt, pred = gt[valid], pred[valid]
        if gt.numel() and (gt.min() < 0 or gt.max() >= c):
            raise ValueError(
                f"label values must be in [0, {c}) or {self.ignore_index}, got {gt.unique()[:10].tolist()}"
            )
        if pred.numel() and (pred.min() < 0 or pred.max() >= c):
            raise ValueError(f"predictions must be in [0, {c}), got {pred.unique()[:10].tolist()}")
        return torch.bincount(gt * c + pred, minlength=c * c).reshape(c, c).cpu()

    def _instances_of(self, pred: torch.Tensor, target: Mapping[str, Any]) -> torch.Tensor:
        """The instance statistics of one target, or a row counting it as an image without an instance file."""
        instances, path = read_instances(target)
        if instances is None:
            if not self._missing_logged:
                self._missing_logged = True
                log.warning("no gtFine instance file %s: iIoU will not be reported", path or target.get("file", "(unnamed)"))
            out = self._empty_instances()
            out[0, -1] = 1
            return out
        pred = _resize_nearest(pred.detach().long(), tuple(instances.shape))
        return instance_stats(pred, instances, self._tables, self._empty_instances())

    def update(self, outputs: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, Any]]) -> None:
        """Adds a batch: ``outputs[i]["sem_seg"]`` (trainIds ``[h, w]``) against ``targets[i]["sem_seg"]``."""
        if len(outputs) != len(targets):
            raise ValueError(f"{len(outputs)} outputs but {len(targets)} targets")
        for output, target in zip(outputs, targets):
            if target.get("sem_seg") is None:
                raise ValueError(f"target of {target.get('file', 'an image')} has no sem_seg (test split?)")
            conf = self.confusion(output["sem_seg"], target["sem_seg"])
            inst = self._instances_of(output["sem_seg"], target) if self.instance_level else self._empty_instances()
            if target.get("file") is not None:
                self._per_file[str(target["file"])] = (conf, inst)
            else:
                self._unnamed = (self._unnamed[0] + conf, self._unnamed[1] + inst)
        self._total = None

    def _local_sum(self, skip: Collection[str] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        conf, inst = self._unnamed[0].clone(), self._unnamed[1].clone()
        for name, (c, i) in self._per_file.items():
            if name not in skip:
                conf += c
                inst += i
        return conf, inst

    def synchronize(self) -> None:
        """Sums the confusion matrices (and instance statistics) of all ranks (``all_reduce``); without
        torch.distributed, the local sums.

        Collective: every rank must call it. Files seen by several ranks are counted once (on the lowest rank),
        found by gathering only the file names.
        """
        if not (dist.is_available() and dist.is_initialized()):
            self._total = self._local_sum()
            return
        names: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(names, sorted(self._per_file))
        rank = dist.get_rank()
        earlier = set().union(*(set(n) for n in names[:rank]))
        # NCCL only reduces CUDA tensors.
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        totals = [t.to(device) for t in self._local_sum(skip=earlier)]
        for t in totals:
            dist.all_reduce(t)
        self._total = (totals[0].cpu(), totals[1].cpu())

    @property
    def confusion_matrix(self) -> torch.Tensor:
        """``int64 [C, C]``: the synchronised sum if :meth:`synchronize` ran since the last update, else the local."""
        return (self._total or self._local_sum())[0].clone()

    def evaluate(self) -> dict[str, Any]:
        """IoU per class, their mean and pixel accuracy.

        Under torch.distributed this synchronises first (collective) if needed; every rank returns the same.

        Returns:
            ``{"mIoU", "per_class_iou": {name: IoU}, "pixel_acc"}``, plus for the 19 Cityscapes classes the
            category-level scores ``"mIoU_category"`` and ``"per_category_iou"`` (a category's pixels count as
            correct when the predicted class is in the same category) and, with instance files for every image,
            ``"iIoU"`` / ``"per_class_iiou"`` and ``"iIoU_category"`` / ``"per_category_iiou"`` (NaN for classes
            and categories without instances). As in cityscapesscripts, a score whose denominator is zero is NaN
            and is left out of its mean (NaN if all are).
        """
        if self._total is None and dist.is_available() and dist.is_initialized():
            self.synchronize()
        conf_int, inst = self._total or self._local_sum()
        conf = conf_int.to(torch.float64)
        tp = conf.diagonal()
        denom = conf.sum(0) + conf.sum(1) - tp  # tp + fp + fn
        ious = [float(t) / float(d) if d > 0 else math.nan for t, d in zip(tp.tolist(), denom.tolist())]
        total = float(conf.sum())
        metrics: dict[str, Any] = {
            # A plain left-to-right sum, the order cityscapesscripts averages in, so the means agree bit for bit.
            "mIoU": _mean(ious),
            "per_class_iou": dict(zip(self.class_names, ious)),
            "pixel_acc": float(tp.sum()) / total if total > 0 else math.nan,
        }
        if not self.is_cityscapes:
            return metrics
        categories = list(CITYSCAPES_CATEGORIES.items())
        per_category = {name: _category_iou(conf, ids) for name, ids in categories}
        metrics["mIoU_category"] = _mean(list(per_category.values()))
        metrics["per_category_iou"] = per_category
        images_without_instances = int(inst[0, -1])
        if self.instance_level and images_without_instances == 0 and total > 0:
            _, _, avg_size = self._tables
            fp = conf.sum(0) - tp  # unweighted, as in cityscapesscripts
            per_class_iiou = {
                name: _ratio(inst[0, i], inst[0, i] + fp[i] + inst[1, i]) if avg_size[i] > 0 else math.nan
                for i, name in enumerate(self.class_names)
            }
            per_category_iiou = {}
            for k, (name, ids) in enumerate(categories):
                if not any(avg_size[i] > 0 for i in ids):  # no instance classes: flat, construction, ...
                    per_category_iiou[name] = math.nan
                    continue
                cat_fp = conf[:, ids].sum() - conf[ids][:, ids].sum()
                j = self.num_classes + k
                per_category_iiou[name] = _ratio(inst[0, j], inst[0, j] + cat_fp + inst[1, j])
            metrics["iIoU"] = _mean(list(per_class_iiou.values()))
            metrics["per_class_iiou"] = per_class_iiou
            metrics["iIoU_category"] = _mean(list(per_category_iiou.values()))
            metrics["per_category_iiou"] = per_category_iiou
        return metrics

    def write_predictions(
        self,
        outputs: Sequence[Mapping[str, torch.Tensor]],
        targets: Sequence[Mapping[str, Any]],
        out_dir: str | os.PathLike[str],
    ) -> list[Path]:
        """:func:`write_predictions` (labelId PNGs for cityscapesscripts / the benchmark server)."""
        return write_predictions(outputs, targets, out_dir)


def _ratio(num: torch.Tensor | float, den: torch.Tensor | float) -> float:
    return float(num) / float(den) if float(den) > 0 else math.nan


def _mean(values: list[float]) -> float:
    """Mean of the non-NaN values (NaN if none), summed left to right as cityscapesscripts does."""
    valid = [v for v in values if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else math.nan


def _category_iou(conf: torch.Tensor, ids: list[int]) -> float:
    """IoU of a group of classes: cityscapesscripts' ``getIouScoreForCategory`` on the trainId confusion matrix."""
    tp = float(conf[ids][:, ids].sum())
    fn = float(conf[ids].sum()) - tp  # labelled in the category, predicted outside it
    fp = float(conf[:, ids].sum()) - tp  # predicted in the category, labelled (and evaluated) outside it
    return _ratio(tp, tp + fp + fn)


def _fmt(value: float) -> str:
    return "  n/a" if math.isnan(value) else f"{value:.3f}"


def format_cityscapes_table(metrics: Mapping[str, Any], width: int = 80) -> str:
    """Renders :meth:`CityscapesEvaluator.evaluate` output: the summary, then per-class IoU in columns.

    Args:
        metrics: ``mIoU``, ``pixel_acc`` and optionally ``per_class_iou``.
        width: Target line width.

    Returns:
        The table text, without a trailing newline; ``n/a`` marks NaN (class absent and never predicted).
    """
    lines = [f"mIoU {_fmt(float(metrics['mIoU']))}   pixel acc {_fmt(float(metrics['pixel_acc']))}"]
    if "mIoU_category" in metrics:
        lines[0] += f"   category mIoU {_fmt(float(metrics['mIoU_category']))}"
    if "iIoU" in metrics:
        lines.append(f"iIoU {_fmt(float(metrics['iIoU']))}   category iIoU {_fmt(float(metrics['iIoU_category']))}")
    per_class = metrics.get("per_class_iou") or {}
    if per_class:
        lines += ["", "Per-class IoU"]
        lines += per_class_columns({n: _fmt(float(v)) for n, v in per_class.items()}, width, max_name=14, gap=3)
    return "\n".join(lines)
