"""Evaluation plots (``eval.plots=true``): PNGs in ``plots/`` beside ``metrics.json``, written by ``densekit eval`` and
by the final evaluation of a training run (not its periodic ones), plus the training curves at the end of a run.

- detection (:mod:`.detection`, :mod:`.error_analysis`): ``pr_curve.png``, ``threshold_curves.png`` (precision,
  recall and F1 against the score threshold, the best F1 marked), ``confusion_matrix.png`` (at IoU 0.5 and the
  best-F1 threshold, with a background row and column), ``per_class_ap.png``, ``error_breakdown.png`` (the COCO
  ``analyze()`` breakdown C75 .. FN), and their numbers in ``plots.json``;
- segmentation (:mod:`.segmentation`): ``confusion_matrix.png`` (rows normalised), ``per_class_iou.png``,
  ``samples.png`` (label, prediction and errors of a few validation images), numbers in ``plots.json``;
- training (:mod:`.training`): ``training.png`` (losses, learning rate, headline metric per evaluation).

matplotlib draws on its Agg canvas; every number plotted comes from a function of these modules that needs no
matplotlib, so tests check numbers rather than pixels.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...checkpoint.io import atomic_write
from .common import PLOTS_DIR

__all__ = ["PLOTS_DIR", "plot_training_run", "plots_line", "write_detection_plots", "write_segmentation_plots",
           "write_training_plot"]

log = logging.getLogger(__name__)


def _write_json(data: Mapping[str, Any], path: Path) -> None:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=1, allow_nan=False, default=float)


def _finite(values: np.ndarray) -> list[float | None]:
    """JSON-ready: NaN (no ground truth) as null."""
    return [None if np.isnan(v) else round(float(v), 6) for v in np.asarray(values, dtype=np.float64)]


def write_detection_plots(coco_eval: Any, out_dir: Path) -> dict[str, Any]:
    """The detection plots of an accumulated pycocotools ``COCOeval`` (bbox) in ``out_dir``.

    Returns:
        ``{"dir", "files", "best_f1", "best_f1_threshold", "error_breakdown": {C75 ... FN}}`` (``metrics["plots"]``);
        ``plots.json`` in ``out_dir`` holds these plus the confusion matrix and the per-class numbers.
    """
    from .detection import (confusion_matrix, draw_ap_bars, draw_confusion_matrix, draw_pr_curves,
                            draw_threshold_curves, pr_curves, threshold_curves)
    from .error_analysis import draw_error_breakdown, error_breakdown

    out_dir = Path(out_dir)
    curves, thresholds, breakdown = pr_curves(coco_eval), threshold_curves(coco_eval), error_breakdown(coco_eval)
    threshold, f1 = thresholds.best
    params = coco_eval.params
    cm = confusion_matrix(coco_eval.cocoGt, coco_eval.cocoDt, params.imgIds, params.catIds, 0.5, threshold)
    files = [
        draw_pr_curves(curves, out_dir / "pr_curve.png"),
        draw_threshold_curves(thresholds, out_dir / "threshold_curves.png"),
        draw_confusion_matrix(cm, out_dir / "confusion_matrix.png", "the best-F1 threshold"),
        draw_ap_bars(curves, out_dir / "per_class_ap.png"),
        draw_error_breakdown(breakdown, out_dir / "error_breakdown.png"),
    ]
    summary = {"dir": str(out_dir), "files": [p.name for p in files], "best_f1": round(f1, 6),
               "best_f1_threshold": threshold, "error_breakdown": {k: round(v, 6) for k, v in breakdown.ap().items()}}
    _write_json({
        **summary,
        "confusion_matrix": {"iou": cm.iou, "score_threshold": cm.score_threshold, "rows": "ground truth",
                             "columns": "detections", "classes": [*cm.class_names, "background"],
                             "counts": cm.matrix.tolist()},
        "per_class": {"AP": dict(zip(curves.class_names, _finite(curves.ap(curves.at_50_95)))),
                      "AP50": dict(zip(curves.class_names, _finite(curves.ap(curves.at_50))))},
        "error_breakdown_per_class": breakdown.per_class_ap(),
    }, out_dir / "plots.json")
    return summary


def write_segmentation_plots(
    confusion: np.ndarray, class_names: Sequence[str], out_dir: Path, samples: Sequence[Any] = (),
    ignore_index: int = 255,
) -> dict[str, Any]:
    """The segmentation plots of a confusion matrix (rows ground truth) and of ``samples``
    (:class:`.segmentation.SegSample`, ``samples.png`` when there are any) in ``out_dir``.

    Returns:
        ``{"dir", "files"}`` (``metrics["plots"]``); ``plots.json`` adds the row-normalised matrix and the IoUs.
    """
    from .segmentation import class_iou, draw_iou_bars, draw_samples, draw_seg_confusion, row_normalized

    out_dir = Path(out_dir)
    confusion = np.asarray(confusion)
    files = [draw_seg_confusion(confusion, class_names, out_dir / "confusion_matrix.png"),
             draw_iou_bars(confusion, class_names, out_dir / "per_class_iou.png")]
    if samples:
        files.append(draw_samples(samples, class_names, ignore_index, out_dir / "samples.png"))
    summary = {"dir": str(out_dir), "files": [p.name for p in files]}
    _write_json({**summary, "classes": list(class_names), "confusion_matrix": confusion.tolist(),
                 "row_normalized": np.round(row_normalized(confusion), 6).tolist(),
                 "iou": dict(zip(class_names, _finite(class_iou(confusion))))}, out_dir / "plots.json")
    return summary


def write_training_plot(metrics_json: Path, out_dir: Path) -> Path | None:
    """``training.png`` in ``out_dir`` from a run's ``metrics.json``; ``None`` (nothing written) when it has neither
    logged steps nor evaluations."""
    from .training import draw_training, read_training_curves

    curves = read_training_curves(Path(metrics_json))
    if not len(curves.steps) and not len(curves.eval_steps):
        return None
    return draw_training(curves, Path(out_dir) / "training.png")


def plot_training_run(run_dir: Path) -> Path | None:
    """``<run_dir>/plots/training.png`` from ``<run_dir>/metrics.json`` at the end of a training run; a run without
    a metrics.json (its final evaluation failed before any was written) gets none, and a failure to draw is logged,
    not raised: the run has finished."""
    metrics_json = Path(run_dir) / "metrics.json"
    if not metrics_json.is_file():
        return None
    out_dir = Path(run_dir) / PLOTS_DIR
    try:
        return write_training_plot(metrics_json, out_dir)
    except Exception as error:  # noqa: BLE001 - the plot is an extra
        log.warning("could not write %s: %s: %s", out_dir / "training.png", type(error).__name__, error)
        return None


def plots_line(metrics: Mapping[str, Any]) -> str | None:
    """The summary line of a tool: where the plots are and, for detection, the best-F1 score threshold as the
    setting that uses it; ``None`` without plots."""
    plots = metrics.get("plots")
    if not plots:
        return None
    line = f"plots: {plots['dir']}"
    if "best_f1_threshold" in plots:
        threshold = plots["best_f1_threshold"]
        line += f"  (best F1 {plots['best_f1']:.3f} at score >= {threshold:.3f}: predict.score_threshold={threshold:g})"
    return line
