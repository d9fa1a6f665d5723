"""COCO bbox evaluation: model outputs -> COCO result dicts -> pycocotools ``COCOeval``, plus test-dev submission files.

Models emit boxes in model-input pixels with 0-based contiguous labels; COCO wants ``[x, y, w, h]`` in original-image
pixels with the original (non-contiguous) category ids. :func:`detections_to_coco` does that mapping and
:class:`CocoEvaluator` accumulates it over a (possibly distributed) evaluation loop.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint.io import atomic_write
from .table import per_class_columns

__all__ = [
    "COCO_METRIC_NAMES",
    "CocoEvaluator",
    "detections_to_coco",
    "format_coco_table",
    "write_results_json",
    "write_test_dev_submission",
]

# Names of COCOeval.stats, in its order.
COCO_METRIC_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _as_int(value: Any) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def detections_to_coco(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    targets: Sequence[Mapping[str, Any]],
    label_to_cat_id: Sequence[int],
    score_threshold: float = 0.001,
) -> list[dict[str, Any]]:
    """Converts per-image model outputs to COCO detection result dicts.

    Args:
        outputs: Per image ``{"boxes": [K, 4] xyxy in model-input pixels, "scores": [K], "labels": [K] int64}``.
        targets: Per image, at least ``image_id``, ``scale`` (model-input pixels per original pixel) and
            ``orig_size`` ``(H, W)`` of the original image.
        label_to_cat_id: Contiguous label -> original COCO category id; a negative id marks a label the dataset
            has no category for, whose detections are dropped.
        score_threshold: Detections scoring below this are dropped (EfficientDet evaluates with 0.001).

    Returns:
        ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` dicts, boxes in original pixels clipped to
        the original image. Boxes lying wholly outside the image become zero-area boxes and are kept: they are
        the model's detections and COCOeval scores them as false positives.

    Raises:
        ValueError: On mismatched lengths or a label outside ``label_to_cat_id``.
    """
    if len(outputs) != len(targets):
        raise ValueError(f"{len(outputs)} outputs but {len(targets)} targets")
    lut = torch.as_tensor(list(label_to_cat_id), dtype=torch.int64)
    results: list[dict[str, Any]] = []
    for output, target in zip(outputs, targets):
        scores = output["scores"].detach().to("cpu", torch.float64).reshape(-1)
        keep = scores >= score_threshold
        scores = scores[keep]
        labels = output["labels"].detach().to("cpu", torch.int64).reshape(-1)[keep]
        # float64 so that dividing by the scale does not move box edges by float32 rounding.
        boxes = output["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4)[keep]
        if labels.numel() and (labels.min() < 0 or labels.max() >= len(lut)):
            raise ValueError(f"labels must lie in [0, {len(lut)}), got {labels.min().item()}..{labels.max().item()}")
        in_dataset = lut[labels] >= 0  # a negative category id: a class the dataset does not have
        scores, labels, boxes = scores[in_dataset], labels[in_dataset], boxes[in_dataset]
        height, width = (_as_float(v) for v in target["orig_size"])
        boxes = boxes / _as_float(target["scale"])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0.0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0.0, height)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        image_id = _as_int(target["image_id"])
        results.extend(
            {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}
            for cat, box, score in zip(lut[labels].tolist(), xywh.tolist(), scores.tolist())
        )
    return results


class CocoEvaluator:
    """Accumulates detections over an evaluation loop and scores them with pycocotools' ``COCOeval`` (bbox).

    Only the images passed to :meth:`update` are evaluated (an image with no detections still counts: its ground
    truth is missed). Detections are kept per image; seeing an image again replaces its detections, so the
    duplicates that ``DistributedSampler`` pads the last batch with are not double counted.

    Args:
        coco_gt: Ground truth ``pycocotools.coco.COCO``.
        label_to_cat_id: Contiguous label -> original COCO category id.
        class_names: Name per contiguous label; defaults to the category names in ``coco_gt``.
        score_threshold: Detections scoring below this are dropped.
    """

    def __init__(
        self,
        coco_gt: Any,
        label_to_cat_id: Sequence[int],
        class_names: Sequence[str] | None = None,
        score_threshold: float = 0.001,
    ) -> None:
        self.coco_gt = coco_gt
        self.label_to_cat_id = [int(c) for c in label_to_cat_id]
        if class_names is None:
            class_names = [coco_gt.loadCats(c)[0]["name"] for c in self.label_to_cat_id]
        if len(class_names) != len(self.label_to_cat_id):
            raise ValueError(f"{len(class_names)} class names for {len(self.label_to_cat_id)} labels")
        self.class_names = list(class_names)
        self.score_threshold = score_threshold
        #: The last evaluation's accumulated pycocotools ``COCOeval`` (main process; None before, or without
        #: detections): what the plots (densekit.evaluation.plots) read.
        self.coco_eval: Any = None
        self.reset()

    def reset(self) -> None:
        """Forgets all accumulated detections."""
        self._per_image: dict[int, list[dict[str, Any]]] = {}
        self._synchronized = True

    def update(self, outputs: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, Any]]) -> None:
        """Adds one batch of model outputs (see :func:`detections_to_coco`)."""
        for output, target in zip(outputs, targets, strict=True):
            self._per_image[_as_int(target["image_id"])] = detections_to_coco(
                [output], [target], self.label_to_cat_id, self.score_threshold
            )
        self._synchronized = False

    @property
    def image_ids(self) -> list[int]:
        """Sorted ids of the images seen so far."""
        return sorted(self._per_image)

    def results(self) -> list[dict[str, Any]]:
        """All COCO result dicts held by this process, ordered by image id."""
        return [det for image_id in self.image_ids for det in self._per_image[image_id]]

    def synchronize(self) -> None:
        """Gathers every rank's detections onto every rank; a no-op unless torch.distributed is initialised.

        Collective: all ranks must call it. An image seen by several ranks keeps the lowest rank's detections.
        """
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self._per_image)
            merged: dict[int, list[dict[str, Any]]] = {}
            for per_image in gathered:
                for image_id, dets in per_image.items():
                    merged.setdefault(image_id, dets)
            self._per_image = merged
        self._synchronized = True

    def evaluate(self) -> dict[str, Any]:
        """Runs COCOeval over the images seen.

        Under torch.distributed this is collective: it synchronises first if :meth:`update` was called since the
        last :meth:`synchronize`, rank 0 evaluates and the metrics are broadcast, so every rank returns the same.

        Returns:
            The 12 COCOeval summary numbers under :data:`COCO_METRIC_NAMES` (-1 where COCO has nothing to score,
            e.g. APs without small ground truth) and ``per_class_ap``: class name -> AP@[.5:.95] (-1 for a class
            without ground truth in the evaluated images). All zeros when there are no detections at all.
        """
        distributed = dist.is_available() and dist.is_initialized()
        if not self._synchronized:
            self.synchronize()
        if not distributed:
            return self._evaluate_local()
        box: list[Any] = [self._evaluate_local() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _evaluate_local(self) -> dict[str, Any]:
        from pycocotools.cocoeval import COCOeval

        results = self.results()
        self.coco_eval = None
        if not results:
            # loadRes cannot take an empty list (it indexes the first result), and no detections score 0 anyway.
            metrics: dict[str, Any] = {name: 0.0 for name in COCO_METRIC_NAMES}
            metrics["per_class_ap"] = {name: 0.0 for name in self.class_names}
            return metrics
        unknown = set(self._per_image) - set(self.coco_gt.getImgIds())
        if unknown:
            raise ValueError(f"image ids not in the ground truth: {sorted(unknown)[:10]}")
        # pycocotools is chatty and annotates the result dicts in place; copy them and keep stdout clean.
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = self.coco_gt.loadRes([dict(r) for r in results])
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            coco_eval.params.imgIds = self.image_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        metrics = {name: float(v) for name, v in zip(COCO_METRIC_NAMES, coco_eval.stats)}
        metrics["per_class_ap"] = self._per_class_ap(coco_eval)
        self.coco_eval = coco_eval
        return metrics

    def _per_class_ap(self, coco_eval: Any) -> dict[str, float]:
        # precision: [iou thresholds, recall points, categories, area ranges, max dets]; -1 marks "no ground truth".
        precision = coco_eval.eval["precision"]
        params = coco_eval.params
        area = params.areaRngLbl.index("all")
        max_det = params.maxDets.index(100)
        per_class: dict[str, float] = {}
        for name, cat_id in zip(self.class_names, self.label_to_cat_id):
            if cat_id < 0:  # a model label the dataset has no category for
                continue
            if cat_id not in params.catIds:
                per_class[name] = -1.0
                continue
            p = precision[:, :, params.catIds.index(cat_id), area, max_det]
            valid = p[p > -1]
            per_class[name] = float(np.mean(valid)) if valid.size else -1.0
        return per_class


def _fmt(value: float) -> str:
    return f"{value:.3f}" if value >= 0 else "  n/a"


def format_coco_table(metrics: Mapping[str, Any], width: int = 80) -> str:
    """Renders :meth:`CocoEvaluator.evaluate` output: the 12 summary numbers, then per-class AP in columns.

    Args:
        metrics: Dict with the names in :data:`COCO_METRIC_NAMES` and optionally ``per_class_ap``.
        width: Target line width; the per-class table uses as many columns as fit (80 classes fit one screen).

    Returns:
        The table text, without a trailing newline. ``n/a`` marks COCO's -1 ("nothing to score").
    """
    lines = []
    for names in (COCO_METRIC_NAMES[:6], COCO_METRIC_NAMES[6:]):
        lines.append("  ".join(f"{n:>6}" for n in names))
        lines.append("  ".join(f"{_fmt(float(metrics[n])):>6}" for n in names))
    per_class = metrics.get("per_class_ap") or {}
    if per_class:
        lines += ["", "Per-class AP@[.5:.95]"]
        lines += per_class_columns({n: _fmt(float(ap)) for n, ap in per_class.items()}, width, max_name=16, gap=2)
    return "\n".join(lines)


def write_results_json(results: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Writes COCO result dicts as a JSON array, atomically (:func:`~densekit.checkpoint.io.atomic_write`).

    Args:
        results: Result dicts, e.g. from :meth:`CocoEvaluator.results`.
        path: Destination file; parent directories are created.

    Returns:
        The destination path.
    """
    path = Path(path)
    with atomic_write(path, "w") as f:
        json.dump(list(results), f)
    return path


def write_test_dev_submission(
    results: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str], model_name: str
) -> tuple[Path, Path]:
    """Writes the COCO evaluation-server submission: ``detections_test-dev2017_<model_name>_results.json`` and a
    zip of the same name holding that file at its root. Both are written atomically.

    Args:
        results: Result dicts for the test-dev images (original category ids, xywh in original pixels).
        out_dir: Destination directory; created if missing.
        model_name: Algorithm name; letters, digits, ``-`` and ``.`` only, since the server splits the file name
            on ``_``.

    Returns:
        ``(json_path, zip_path)``.

    Raises:
        ValueError: If ``model_name`` is empty or holds other characters.
    """
    if not re.fullmatch(r"[A-Za-z0-9.\-]+", model_name):
        raise ValueError(
            f"model_name {model_name!r} must be letters, digits, '-' or '.' (the server splits the file name on '_')"
        )
    out_dir = Path(out_dir)
    stem = f"detections_test-dev2017_{model_name}_results"
    json_path = write_results_json(results, out_dir / f"{stem}.json")
    zip_path = out_dir / f"{stem}.zip"
    with atomic_write(zip_path) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(json_path, arcname=json_path.name)
    return json_path, zip_path
