"""Detection plots from a finished pycocotools evaluation (``COCOeval`` after ``evaluate()`` and ``accumulate()``):
precision-recall curves per class, precision / recall / F1 against the score threshold, a confusion matrix with a
background row and column, per-class AP bars and the COCO error breakdown (:mod:`.error_analysis`).

Each plot's numbers come from a pure function here (no matplotlib), so that they can be checked against
pycocotools: the PR curves are pycocotools' accumulated ``eval["precision"]`` array (``T x R x K x A x M``: IoU
thresholds, 101 recall points, categories, area ranges, max detections), read at area ``all`` and 100 detections,
not recomputed; the threshold curves count pycocotools' own matches (``evalImgs``) at IoU 0.5.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import MAX_LABELLED_CLASSES, bar_width, draw_class_bars, draw_matrix, matrix_size, new_figure, save_figure

__all__ = ["PRCurves", "ThresholdCurves", "ConfusionMatrix", "pr_curves", "curve_area", "threshold_curves",
           "confusion_matrix", "draw_pr_curves", "draw_threshold_curves", "draw_confusion_matrix", "draw_ap_bars"]

#: The score thresholds the threshold curves are read at (0.001 apart, as predict.score_threshold is given).
THRESHOLDS = np.round(np.linspace(0.0, 1.0, 1001), 3)


def area_and_max_det(params: Any) -> tuple[int, int]:
    """Indices of area range ``all`` and of 100 detections per image (the COCO AP setting) in ``params``."""
    max_dets = list(params.maxDets)
    return list(params.areaRngLbl).index("all"), max_dets.index(100) if 100 in max_dets else len(max_dets) - 1


def iou_index(params: Any, iou: float) -> int:
    """Index of the IoU threshold ``iou`` in ``params.iouThrs``."""
    found = np.flatnonzero(np.isclose(np.asarray(params.iouThrs), iou))
    if not found.size:
        raise ValueError(f"the evaluation has no IoU threshold {iou} (it has {list(params.iouThrs)})")
    return int(found[0])


def category_names(coco_eval: Any) -> list[str]:
    """The names of the evaluated categories, in ``params.catIds`` order (the K axis of the precision array)."""
    cats = coco_eval.cocoGt.cats
    return [str(cats[c].get("name", c)) for c in coco_eval.params.catIds]


@dataclass(frozen=True)
class PRCurves:
    """Interpolated precision at COCO's 101 recall points, per category (NaN rows: no ground truth)."""

    recall: np.ndarray  # [R]
    at_50: np.ndarray  # [K, R] at IoU 0.5
    at_50_95: np.ndarray  # [K, R] mean over the IoU thresholds 0.5:0.95
    class_names: list[str]

    def ap(self, curve: np.ndarray) -> np.ndarray:
        """The area under each row of ``curve`` (``at_50`` or ``at_50_95``): pycocotools' per-class AP."""
        return np.array([curve_area(self.recall, row) for row in curve])


def _valid(precision: np.ndarray) -> np.ndarray:
    """pycocotools' -1 ("no ground truth") as NaN."""
    return np.where(precision > -1, precision, np.nan)


def pr_curves(coco_eval: Any) -> PRCurves:
    """The per-class PR curves of an accumulated ``COCOeval``, read from its precision array."""
    params = coco_eval.params
    area, max_det = area_and_max_det(params)
    precision = _valid(np.asarray(coco_eval.eval["precision"])[:, :, :, area, max_det])  # [T, R, K]
    t50 = iou_index(params, 0.5)
    mean = precision.mean(0)  # a class with ground truth has a value at every IoU and recall; one without, none
    return PRCurves(np.asarray(params.recThrs, dtype=np.float64), precision[t50].T, mean.T, category_names(coco_eval))


def curve_area(recall: np.ndarray, precision: np.ndarray) -> float:
    """COCO's AP of one PR curve: the mean interpolated precision over the recall points (NaN: no ground truth)."""
    del recall  # the points are evenly spaced: the mean is the area, as COCO defines it
    return float(np.mean(precision)) if not np.isnan(precision).any() else float("nan")


@dataclass(frozen=True)
class ThresholdCurves:
    """Precision, recall and F1 of the detections scoring at least each threshold, at one IoU.

    ``precision`` / ``recall`` / ``f1`` pool all classes (every detection and ground truth counted once); the
    per-class F1 rows are drawn thin. Precision is 1 where no detection is kept (nothing wrong was kept).
    """

    thresholds: np.ndarray  # [N]
    precision: np.ndarray  # [N]
    recall: np.ndarray  # [N]
    f1: np.ndarray  # [N]
    per_class_f1: np.ndarray  # [K, N], NaN rows: no ground truth
    class_names: list[str]
    iou: float

    @property
    def best(self) -> tuple[float, float]:
        """``(threshold, F1)`` at the highest pooled F1 (the lowest such threshold on a tie)."""
        i = int(np.argmax(self.f1))
        return float(self.thresholds[i]), float(self.f1[i])


def _matches(coco_eval: Any, t: int, area: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Per category: the scores and true-positive flags of its detections that are not ignored, and its number of
    ground truths that are not ignored (pycocotools' ``evalImgs`` at IoU index ``t``, area index ``area``)."""
    params = coco_eval.params
    n_img, n_area = len(params.imgIds), len(params.areaRng)
    out = []
    for k in range(len(params.catIds)):
        scores, tps, n_gt = [], [], 0
        for entry in coco_eval.evalImgs[(k * n_area + area) * n_img: (k * n_area + area + 1) * n_img]:
            if entry is None:
                continue
            n_gt += int(np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0))
            if len(entry["dtScores"]):  # dtMatches / dtIgnore: [T, D]
                keep = ~np.asarray(entry["dtIgnore"], dtype=bool)[t]
                scores.append(np.asarray(entry["dtScores"], dtype=np.float64)[keep])
                tps.append(np.asarray(entry["dtMatches"])[t][keep] > 0)
        out.append((np.concatenate(scores or [np.zeros(0)]), np.concatenate(tps or [np.zeros(0, bool)]), n_gt))
    return out


def _prf(scores: np.ndarray, tp: np.ndarray, n_gt: int, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
    """Precision, recall and F1 of the detections scoring >= each threshold."""
    order = np.argsort(-scores, kind="mergesort")
    kept = np.searchsorted(-scores[order], -thresholds, side="right")  # detections scoring >= each threshold
    true = np.concatenate([[0], np.cumsum(tp[order])])[kept]
    precision = np.where(kept > 0, true / np.maximum(kept, 1), 1.0)
    recall = true / n_gt if n_gt else np.full(len(thresholds), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall), nan=0.0)
    return precision, recall, f1 if n_gt else np.full(len(thresholds), np.nan)


def threshold_curves(coco_eval: Any, iou: float = 0.5, thresholds: np.ndarray = THRESHOLDS) -> ThresholdCurves:
    """Precision, recall and F1 against the score threshold from pycocotools' matches at ``iou`` (area ``all``, the
    100 best detections per image)."""
    area, _ = area_and_max_det(coco_eval.params)
    per_class = _matches(coco_eval, iou_index(coco_eval.params, iou), area)
    scores = np.concatenate([s for s, _, _ in per_class])
    tp = np.concatenate([t for _, t, _ in per_class])
    n_gt = sum(n for _, _, n in per_class)
    precision, recall, f1 = _prf(scores, tp, n_gt, thresholds)
    if not n_gt:
        recall, f1 = np.zeros(len(thresholds)), np.zeros(len(thresholds))
    per_class_f1 = np.stack([_prf(s, t, n, thresholds)[2] for s, t, n in per_class] or [np.zeros((0, len(thresholds)))])
    return ThresholdCurves(thresholds, precision, recall, f1, per_class_f1, category_names(coco_eval), iou)


@dataclass(frozen=True)
class ConfusionMatrix:
    """Detections against ground truth at one IoU and score threshold: ``matrix[i, j]`` counts ground truth of class
    ``i`` matched by a detection of class ``j``; the last row (background) counts detections that matched nothing,
    the last column ground truth that nothing matched."""

    matrix: np.ndarray  # int64 [K + 1, K + 1], rows ground truth, columns detections
    class_names: list[str]
    iou: float
    score_threshold: float


def _greedy(
    iou: np.ndarray, allowed: np.ndarray, threshold: float, free_dt: np.ndarray, free_gt: np.ndarray,
) -> list[tuple[int, int]]:
    """COCO-style matching: each free detection, best score first, takes the free ground truth it overlaps most
    (IoU >= ``threshold``) among those ``allowed``; the pairs made (``free_*`` updated)."""
    pairs = []
    for d in np.flatnonzero(free_dt):
        candidates = np.where(free_gt & allowed[d] & (iou[d] >= threshold), iou[d], -1.0)
        g = int(np.argmax(candidates)) if candidates.size else -1
        if g >= 0 and candidates[g] >= 0:
            pairs.append((int(d), g))
            free_dt[d], free_gt[g] = False, False
    return pairs


def _count_image(
    matrix: np.ndarray, gts: list[dict], dts: list[dict], index: dict[int, int], iou_thr: float,
) -> None:
    """Adds one image's counts to ``matrix``: same-class matches first, then matches across classes, then the
    unmatched detections (background row; those on a crowd region are ignored, as COCO does) and ground truth."""
    from pycocotools import mask as mask_utils

    background = len(index)
    crowd = [g for g in gts if g.get("iscrowd", 0)]
    gts = [g for g in gts if not g.get("iscrowd", 0) and g["category_id"] in index]
    dts = sorted((d for d in dts if d["category_id"] in index), key=lambda d: -d["score"])
    g_cls = np.array([index[g["category_id"]] for g in gts], dtype=np.int64)
    d_cls = np.array([index[d["category_id"]] for d in dts], dtype=np.int64)
    free_dt, free_gt = np.ones(len(dts), bool), np.ones(len(gts), bool)
    if dts and gts:
        iou = np.asarray(mask_utils.iou([d["bbox"] for d in dts], [g["bbox"] for g in gts], [0] * len(gts)))
        for allowed in (d_cls[:, None] == g_cls[None], np.ones(iou.shape, bool)):
            for d, g in _greedy(iou, allowed, iou_thr, free_dt, free_gt):
                matrix[g_cls[g], d_cls[d]] += 1
    if dts and crowd:  # a crowd box's IoU in pycocotools is the detection's share inside it
        inside = np.asarray(mask_utils.iou([d["bbox"] for d in dts], [g["bbox"] for g in crowd], [1] * len(crowd)))
        free_dt &= inside.max(1) < iou_thr
    np.add.at(matrix, (background, d_cls[free_dt]), 1)
    np.add.at(matrix, (g_cls[free_gt], background), 1)


def confusion_matrix(
    coco_gt: Any, coco_dt: Any, img_ids: Sequence[int], cat_ids: Sequence[int], iou: float = 0.5,
    score_threshold: float = 0.25,
) -> ConfusionMatrix:
    """The confusion matrix of the detections scoring at least ``score_threshold`` on ``img_ids``, matched at IoU
    >= ``iou`` (see :class:`ConfusionMatrix`; each detection and ground truth is counted once)."""
    index = {int(c): i for i, c in enumerate(cat_ids)}
    matrix = np.zeros((len(index) + 1, len(index) + 1), dtype=np.int64)
    for img_id in img_ids:
        dts = [d for d in coco_dt.imgToAnns.get(img_id, []) if d["score"] >= score_threshold]
        _count_image(matrix, coco_gt.imgToAnns.get(img_id, []), dts, index, iou)
    names = [str(coco_gt.cats[c].get("name", c)) for c in cat_ids]
    return ConfusionMatrix(matrix, names, iou, score_threshold)


def _draw_curves(ax: Any, x: np.ndarray, rows: np.ndarray, names: Sequence[str], labels: Sequence[str]) -> None:
    """Thin per-class lines (a legend entry each when few), then their mean over the classes with ground truth."""
    few = len(names) <= MAX_LABELLED_CLASSES
    for row, label in zip(rows, labels):
        if not np.isnan(row).all():
            ax.plot(x, row, linewidth=1.0, alpha=0.8 if few else 0.35, label=label if few else None)


def draw_pr_curves(curves: PRCurves, path: Path) -> Path:
    """``pr_curve.png``: per-class PR curves at IoU 0.5 and 0.5:0.95, their mean in bold, AP in the legend."""
    figure = new_figure(12.0, 5.5)
    for ax, rows, iou in zip(figure.subplots(1, 2), (curves.at_50, curves.at_50_95), ("0.5", "0.5:0.95")):
        ap = curves.ap(rows)
        _draw_curves(ax, curves.recall, rows, curves.class_names,
                     [f"{n} {a:.3f}" for n, a in zip(curves.class_names, ap)])
        valid = ~np.isnan(rows).all(1)
        if valid.any():
            mean = rows[valid].mean(0)
            ax.plot(curves.recall, mean, color="black", linewidth=2.5,
                    label=f"all classes {curve_area(curves.recall, mean):.3f}")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=f"precision-recall, IoU {iou}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=7)
    return save_figure(figure, path)


def draw_threshold_curves(curves: ThresholdCurves, path: Path) -> Path:
    """``threshold_curves.png``: precision, recall and F1 against the score threshold, the best F1 marked."""
    figure = new_figure(15.0, 4.8)
    threshold, f1 = curves.best
    pooled = {"precision": curves.precision, "recall": curves.recall, "F1": curves.f1}
    for ax, (name, values) in zip(figure.subplots(1, 3), pooled.items()):
        if name == "F1":
            _draw_curves(ax, curves.thresholds, curves.per_class_f1, curves.class_names, curves.class_names)
        ax.plot(curves.thresholds, values, color="black", linewidth=2.5, label="all classes")
        ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1.2,
                   label=f"best F1 {f1:.3f} at score {threshold:.3f}")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="score threshold", ylabel=name,
               title=f"{name} against the score threshold, IoU {curves.iou:g}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left" if name != "recall" else "upper right", fontsize=7)
    return save_figure(figure, path)


def draw_confusion_matrix(cm: ConfusionMatrix, path: Path, basis: str) -> Path:
    """``confusion_matrix.png``: counts in the cells, colours the share of each ground-truth row (the background
    row: of all unmatched detections)."""
    names = [*cm.class_names, "background"]
    side = matrix_size(len(names))
    figure = new_figure(side + 1.5, side)
    ax = figure.subplots()
    totals = cm.matrix.sum(1, keepdims=True)
    shares = np.divide(cm.matrix, totals, out=np.zeros(cm.matrix.shape), where=totals > 0)
    text = np.where(cm.matrix > 0, cm.matrix.astype(str), "")
    draw_matrix(ax, shares, text, names, names, ("ground truth", "detection"))
    ax.set_title(f"confusion matrix\nIoU >= {cm.iou:g}, score >= {cm.score_threshold:.3f} ({basis})")
    return save_figure(figure, path)


def draw_ap_bars(curves: PRCurves, path: Path) -> Path:
    """``per_class_ap.png``: AP@[.5:.95] and AP50 per class."""
    figure = new_figure(bar_width(len(curves.class_names)), 4.8)
    ax = figure.subplots()
    ap, ap50 = curves.ap(curves.at_50_95), curves.ap(curves.at_50)
    draw_class_bars(ax, curves.class_names, {"AP@[.5:.95]": ap, "AP50": ap50}, "AP")
    valid = ~np.isnan(ap)
    mean = ap[valid].mean() if valid.any() else 0.0
    ax.set_title(f"per-class AP (mean over the classes with ground truth: {mean:.3f})")
    return save_figure(figure, path)
