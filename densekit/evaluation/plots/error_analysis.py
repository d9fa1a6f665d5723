"""The COCO error breakdown: the ``analyze()`` of the COCO API (Hoiem et al.'s "Diagnosing error in object
detectors" as the COCO detection challenge plots it), which pycocotools' Python package does not have.

Seven precision-recall curves, each forgiving one more kind of error than the one before, so that the area between
two successive curves is the AP that kind of error costs:

======  ==========================================================================================================
C75     PR at IoU 0.75: pycocotools' AP75 (read from the accumulated precision array, not recomputed)
C50     PR at IoU 0.5: pycocotools' AP50 (likewise)
Loc     PR at IoU 0.1: localisation errors forgiven (duplicate detections still count as false positives)
Sim     and confusions with a class of the same supercategory forgiven (categories without a ``supercategory``
        are each their own: Sim then equals Loc)
Oth     and confusions with any other class forgiven
BG      and every other false positive (background) forgiven: precision 1 at each recall the detections reach
FN      and the missed objects forgiven: precision 1 at every recall, so its AP is 1 by definition
======  ==========================================================================================================

Loc, Sim and Oth are new evaluations with relaxed settings, as Detectron's and MMDetection's
``coco_error_analysis`` do: pycocotools at one IoU threshold (0.1), area ``all``, 100 detections per image, where
for Sim / Oth every ground-truth box of another class (of the same supercategory / of any) is added again as a
*crowd* box of each class with a detection on it, which pycocotools ignores, so that a detection of the wrong class
on it is neither a true nor a false positive. One evaluation covers all classes at once (pycocotools evaluates each
image and class on its own, so this equals one evaluation per class). The numbers are means over the classes with
ground truth, as pycocotools' AP.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import new_figure, save_figure
from .detection import area_and_max_det, category_names, iou_index

__all__ = ["ERROR_TYPES", "ErrorBreakdown", "error_breakdown", "format_error_table", "draw_error_breakdown"]

ERROR_TYPES: tuple[str, ...] = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")
#: What each curve forgives beyond the one before, for the table.
ERROR_MEANING: dict[str, str] = {
    "C75": "PR at IoU .75", "C50": "PR at IoU .50", "Loc": "PR at IoU .10 (localisation errors forgiven)",
    "Sim": "+ same-supercategory confusions forgiven", "Oth": "+ all class confusions forgiven",
    "BG": "+ background false positives forgiven", "FN": "+ missed objects forgiven",
}
_COLOURS = ("#1f4e79", "#2e75b6", "#9dc3e6", "#c0504d", "#70ad47", "#8064a2", "#f79646")


@dataclass(frozen=True)
class ErrorBreakdown:
    """The seven curves per class: ``precision[e, r, k]`` for error type ``e`` (:data:`ERROR_TYPES`), recall point
    ``r`` and class ``k`` (NaN for a class without ground truth)."""

    recall: np.ndarray  # [R]
    precision: np.ndarray  # [7, R, K]
    class_names: list[str]

    @property
    def valid(self) -> np.ndarray:
        """The classes with ground truth."""
        return ~np.isnan(self.precision[0]).any(0)

    @property
    def curves(self) -> np.ndarray:
        """``[7, R]``: the all-classes curves (means over the classes with ground truth; zeros if none)."""
        if not self.valid.any():
            return np.zeros(self.precision.shape[:2])
        return self.precision[:, :, self.valid].mean(2)

    def ap(self) -> dict[str, float]:
        """The AP of each all-classes curve, by error type (C75 = pycocotools' AP75, C50 = AP50, FN = 1)."""
        return {name: float(curve.mean()) for name, curve in zip(ERROR_TYPES, self.curves)}

    def per_class_ap(self) -> dict[str, dict[str, float]]:
        """Class name -> the seven APs of its own curves (classes with ground truth only)."""
        means = self.precision.mean(1)  # [7, K]
        return {name: dict(zip(ERROR_TYPES, means[:, k].tolist()))
                for k, name in enumerate(self.class_names) if self.valid[k]}


def _confusion_boxes(
    coco_gt: Any, coco_dt: Any, img_ids: Sequence[int], cat_ids: Sequence[int], same_super: bool,
) -> list[dict]:
    """Every ground-truth box again as an ignored (crowd) box of each other class with a detection on it (a tenth
    of the detection inside it: less changes nothing at IoU 0.1); with ``same_super`` only the classes of its
    supercategory."""
    from pycocotools import mask as mask_utils

    supercategory = {c: coco_gt.cats[c].get("supercategory", c) for c in cat_ids}
    next_id = max(coco_gt.anns, default=0) + 1
    added: list[dict] = []
    for img_id in img_ids:
        dts = [d for d in coco_dt.imgToAnns.get(img_id, []) if d["category_id"] in supercategory]
        gts = coco_gt.imgToAnns.get(img_id, [])
        if not dts or not gts:
            continue
        # pycocotools' crowd IoU: the share of the detection inside the ground-truth box.
        inside = np.asarray(mask_utils.iou([d["bbox"] for d in dts], [g["bbox"] for g in gts], [1] * len(gts))) >= 0.1
        for g, gt in enumerate(gts):
            own = gt["category_id"]
            for cat in sorted({dts[d]["category_id"] for d in np.flatnonzero(inside[:, g])} - {own}):
                if same_super and supercategory[cat] != supercategory.get(own, own):
                    continue
                added.append({"id": next_id + len(added), "image_id": img_id, "category_id": cat, "bbox": gt["bbox"],
                              "area": gt["area"], "iscrowd": 1})
    return added


def _relaxed_precision(coco_eval: Any, extra_gts: list[dict]) -> np.ndarray:
    """``[R, K]`` interpolated precision of a pycocotools evaluation at IoU 0.1, area ``all``, 100 detections per
    image, of ``coco_eval``'s detections against its ground truth plus ``extra_gts``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    source = coco_eval.cocoGt
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {**source.dataset, "annotations": [dict(a) for a in source.anns.values()] + extra_gts}
        gt.createIndex()
        relaxed = COCOeval(gt, coco_eval.cocoDt, iouType=coco_eval.params.iouType)
        relaxed.params.imgIds = list(coco_eval.params.imgIds)
        relaxed.params.catIds = list(coco_eval.params.catIds)
        relaxed.params.iouThrs = np.array([0.1])
        relaxed.params.maxDets = [100]
        relaxed.params.areaRng, relaxed.params.areaRngLbl = [[0.0, 1e10]], ["all"]
        relaxed.evaluate()
        relaxed.accumulate()
    return np.asarray(relaxed.eval["precision"])[0, :, :, 0, 0]


def error_breakdown(coco_eval: Any) -> ErrorBreakdown:
    """The seven curves of ``analyze()`` for an accumulated ``COCOeval`` (see the module docstring)."""
    params = coco_eval.params
    area, max_det = area_and_max_det(params)
    precision = np.asarray(coco_eval.eval["precision"])[:, :, :, area, max_det]  # [T, R, K]
    gt, dt, img_ids, cat_ids = coco_eval.cocoGt, coco_eval.cocoDt, params.imgIds, params.catIds
    curves = [
        precision[iou_index(params, 0.75)],
        precision[iou_index(params, 0.5)],
        _relaxed_precision(coco_eval, []),
        _relaxed_precision(coco_eval, _confusion_boxes(gt, dt, img_ids, cat_ids, same_super=True)),
        _relaxed_precision(coco_eval, _confusion_boxes(gt, dt, img_ids, cat_ids, same_super=False)),
    ]
    curves.append((curves[-1] > 0).astype(np.float64))  # BG: precision 1 wherever Oth reaches that recall
    curves.append(np.ones_like(curves[0]))  # FN: everything found
    stacked = np.stack(curves)
    stacked[:, :, precision[0, 0] <= -1] = np.nan  # pycocotools' -1: a class without ground truth
    return ErrorBreakdown(np.asarray(params.recThrs, dtype=np.float64), stacked, category_names(coco_eval))


def format_error_table(ap: dict[str, float]) -> str:
    """The seven APs of :meth:`ErrorBreakdown.ap` as two aligned lines under a heading."""
    heading = "COCO error breakdown (AP as each error is forgiven; all classes, area all, 100 detections)"
    return "\n".join([heading, "  ".join(f"{n:>6}" for n in ERROR_TYPES),
                      "  ".join(f"{ap[n]:>6.3f}" for n in ERROR_TYPES)])


def draw_error_breakdown(breakdown: ErrorBreakdown, path: Path) -> Path:
    """``error_breakdown.png``: the classic stacked PR areas, ``[AP] type`` in the legend, and the table of the seven
    APs with what each error costs (the gain from forgiving it)."""
    figure = new_figure(11.0, 5.5)
    plot, table = figure.subplots(1, 2, width_ratios=[1.5, 1.0])
    curves, ap = breakdown.curves, breakdown.ap()
    below = np.zeros_like(breakdown.recall)
    for name, curve, colour in zip(ERROR_TYPES, curves, _COLOURS):
        plot.fill_between(breakdown.recall, below, curve, color=colour, label=f"[{ap[name]:.3f}] {name}")
        plot.plot(breakdown.recall, curve, color="black", linewidth=0.5)
        below = curve
    plot.set(xlim=(0, 1), ylim=(0, 1), xlabel="recall", ylabel="precision",
             title="COCO error breakdown: all classes, area all, 100 detections")
    plot.legend(loc="lower left", fontsize=8)
    gains = np.diff([0.0, *ap.values()])
    rows = [[name, f"{ap[name]:.3f}", f"{gain:+.3f}", ERROR_MEANING[name]] for name, gain in zip(ERROR_TYPES, gains)]
    table.axis("off")
    cells = table.table(cellText=rows, colLabels=["", "AP", "gain", "forgiven"], loc="center", cellLoc="left")
    cells.auto_set_font_size(False)
    cells.set_fontsize(8)
    cells.auto_set_column_width(list(range(4)))
    return save_figure(figure, path)
