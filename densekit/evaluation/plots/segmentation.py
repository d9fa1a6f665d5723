"""Segmentation plots from the evaluation's confusion matrix (rows ground truth, columns prediction, as
:class:`~densekit.evaluation.cityscapes.CityscapesEvaluator` keeps it): the row-normalised confusion matrix, IoU per
class, and a few validation images with their label, the prediction and the pixels it gets wrong.

The numbers (:func:`row_normalized`, :func:`class_iou`, :func:`error_map`) need no matplotlib.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ...utils.visualize import overlay_segmentation
from .common import bar_width, draw_class_bars, draw_matrix, matrix_size, new_figure, save_figure

__all__ = ["SegSample", "row_normalized", "class_iou", "error_map", "draw_seg_confusion", "draw_iou_bars",
           "draw_samples"]

CORRECT, WRONG, IGNORED = 0, 1, -1


@dataclass(frozen=True)
class SegSample:
    """One validation image for :func:`draw_samples`, everything at the label's size."""

    name: str
    image: np.ndarray  # uint8 [H, W, 3] RGB
    label: np.ndarray  # int [H, W] classes, ignore_index where unlabelled
    prediction: np.ndarray  # int [H, W] classes


def row_normalized(confusion: np.ndarray) -> np.ndarray:
    """``confusion[i, j] / sum_j confusion[i, j]``: which classes the pixels of class ``i`` are predicted as (a row
    without pixels is all zeros)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    totals = confusion.sum(1, keepdims=True)
    return np.divide(confusion, totals, out=np.zeros_like(confusion), where=totals > 0)


def class_iou(confusion: np.ndarray) -> np.ndarray:
    """IoU per class, ``tp / (tp + fp + fn)``; NaN for a class neither labelled nor predicted."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    return np.divide(tp, union, out=np.full(len(tp), np.nan), where=union > 0)


def error_map(label: np.ndarray, prediction: np.ndarray, ignore_index: int) -> np.ndarray:
    """``int8`` map: :data:`CORRECT` (0), :data:`WRONG` (1), or :data:`IGNORED` (-1) where the label is
    ``ignore_index``."""
    out = np.where(np.asarray(label) == np.asarray(prediction), CORRECT, WRONG).astype(np.int8)
    out[np.asarray(label) == ignore_index] = IGNORED
    return out


def error_overlay(image: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """RGB: the photo dimmed where correct, red where wrong, dark where unlabelled."""
    out = image.astype(np.float32) * 0.55
    out[errors == WRONG] = 0.3 * out[errors == WRONG] + 0.7 * np.array([255.0, 20.0, 20.0])
    out[errors == IGNORED] *= 0.35
    return out.clip(0, 255).astype(np.uint8)


def draw_seg_confusion(confusion: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """``confusion_matrix.png``: each ground-truth row normalised to 1 (the share of its pixels per prediction)."""
    shares = row_normalized(confusion)
    side = matrix_size(len(class_names))
    figure = new_figure(side + 1.5, side)
    ax = figure.subplots()
    text = np.where(shares >= 0.005, np.char.mod("%.2f", shares), "")
    draw_matrix(ax, shares, text, class_names, class_names, ("ground truth", "prediction"))
    ax.set_title("confusion matrix (pixels, each row normalised)")
    return save_figure(figure, path)


def draw_iou_bars(confusion: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """``per_class_iou.png``: IoU per class and the mean over the classes that have one (mIoU)."""
    iou = class_iou(confusion)
    figure = new_figure(bar_width(len(class_names)), 4.8)
    ax = figure.subplots()
    draw_class_bars(ax, class_names, {"IoU": iou}, "IoU")
    valid = ~np.isnan(iou)
    miou = float(iou[valid].mean()) if valid.any() else float("nan")
    ax.axhline(miou, color="tab:red", linestyle="--", linewidth=1.2)
    ax.set_title(f"IoU per class (mIoU {miou:.3f})")
    return save_figure(figure, path)


def _fit(image: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """``image`` resized to ``size`` (H, W) when it is not that size already."""
    if image.shape[:2] == size:
        return image
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(image, (size[1], size[0]), interpolation=interpolation)


def draw_samples(samples: Sequence[SegSample], class_names: Sequence[str], ignore_index: int, path: Path) -> Path:
    """``samples.png``: a row per image: its label and the prediction overlaid on it, and its errors (red)."""
    aspect = samples[0].label.shape[0] / samples[0].label.shape[1] if samples else 1.0
    figure = new_figure(13.5, (4.5 * aspect + 0.4) * max(len(samples), 1))  # three 4.5-inch panels a row
    axes = np.asarray(figure.subplots(max(len(samples), 1), 3, squeeze=False))
    for row, sample in zip(axes, samples):
        size = tuple(sample.label.shape[:2])
        image = _fit(sample.image, size, nearest=False)
        prediction = _fit(sample.prediction.astype(np.int32), size, nearest=True)
        panels = {
            "label": overlay_segmentation(image, sample.label, class_names, ignore_index=ignore_index)[..., ::-1],
            "prediction": overlay_segmentation(image, prediction, class_names, ignore_index=None)[..., ::-1],
            "errors (red; dark: unlabelled)": error_overlay(image, error_map(sample.label, prediction, ignore_index)),
        }
        for ax, (title, panel) in zip(row, panels.items()):
            ax.imshow(panel)
            ax.set_title(f"{sample.name}: {title}" if title == "label" else title, fontsize=9)
            ax.axis("off")
    return save_figure(figure, path)
