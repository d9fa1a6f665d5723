"""What the tools need to know about a task, chosen by ``data.format``: datasets, class count, evaluation, summary.

Detection (COCO format) pairs with ``arch: efficientdet`` models, segmentation (Cityscapes layout) with
``arch: segmenter``; everything else (engine, loaders, checkpoints) is shared.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.cityscapes import NUM_CLASSES as CITYSCAPES_NUM_CLASSES
from ..data.build import build_detection_dataset, build_segmentation_dataset, input_size, task_of
from ..modeling.build import list_models
from .evaluate import evaluate_detector, evaluate_segmenter

ARCH_OF_TASK = {"detection": "efficientdet", "segmentation": "segmenter"}


def check_model_fits_task(cfg: Any) -> str:
    """The task of ``cfg.data``; raises if ``cfg.model`` is built for the other one."""
    task = task_of(cfg.data)
    arch = cfg.model.get("arch", "efficientdet")
    if arch != ARCH_OF_TASK[task]:
        raise ValueError(
            f"model={cfg.model.name} (arch {arch}) does not fit data={cfg.data.name}, a {task} dataset; pick an "
            f"arch {ARCH_OF_TASK[task]} model: {', '.join(list_models(arch=ARCH_OF_TASK[task]))}"
        )
    return task


def build_dataset(cfg: Any, split: str, train: bool) -> Any:
    """The split's dataset with the train or eval transform for ``cfg.model`` (padding with its pixel mean)."""
    if task_of(cfg.data) == "detection":
        size = input_size(cfg.data, cfg.model)
        return build_detection_dataset(cfg.data, split, size, train=train, pixel_mean=cfg.model.pixel_mean)
    return build_segmentation_dataset(cfg.data, split, train=train, pixel_mean=cfg.model.pixel_mean)


def num_classes_of(dataset: Any) -> int:
    """Classes a model trained on ``dataset`` predicts (COCO: its categories; Cityscapes: the 19 trainIds)."""
    return int(getattr(dataset, "num_classes", CITYSCAPES_NUM_CLASSES))


def make_evaluate(cfg: Any, dataset: Any, loader: Any, device: torch.device, out_dir: Path) -> Callable[[nn.Module], dict]:
    """``evaluate(model) -> metrics`` for the task, writing its result files under ``out_dir``."""
    if task_of(cfg.data) == "detection":
        return lambda model: evaluate_detector(
            model, dataset, loader, device, out_dir, cfg.data.split, cfg.model.name,
            score_threshold=cfg.eval.score_threshold, visualize=cfg.eval.visualize,
        )
    return lambda model: evaluate_segmenter(
        model, dataset, loader, device, out_dir, cfg.data.split,
        scales=tuple(cfg.data.get("eval_scales", [1.0])), flip=bool(cfg.data.get("eval_flip", False)),
        write_pngs=bool(cfg.data.get("write_predictions", False)), visualize=cfg.eval.visualize,
    )


def headline(metrics: dict) -> str:
    """The one line a user looks for at the end of a run."""
    if "mIoU" in metrics:
        return f"mIoU {metrics['mIoU']:.3f}  pixel accuracy {metrics.get('pixel_acc', float('nan')):.3f}"
    nan = float("nan")
    return f"AP {metrics.get('AP', nan):.3f}  AP50 {metrics.get('AP50', nan):.3f}  AP75 {metrics.get('AP75', nan):.3f}"
