"""``densekit inspect`` of a COCO-format detection dataset, read from its json as written (see the package
docstring)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...modeling.anchor_fit import (
    WARN_BELOW, AnchorGeometry, AnchorSetting, boxes_at_input_size, fit_anchors, format_anchor_fit,
)
from ...utils.visualize import draw_detections
from ..coco import CocoDetection
from ..decode import decode_file
from .figures import TILE, bar_chart, fit_tile, histogram, sample_mosaic
from .report import Inspection, Problem, duplicate_files, file_problems, percentiles, sample_order

#: Boxes the anchor section compares (a seeded random subset of larger datasets).
ANCHOR_BOXES = 5000
#: A box may overrun its image by this much (pixels) before it counts as outside: rounding in converted datasets.
OUTSIDE_TOLERANCE = 1.0


@dataclass
class _Boxes:
    """The json's annotations as arrays (one row each), with the image each belongs to."""

    ids: np.ndarray
    image: np.ndarray  # index into the image list
    label: np.ndarray  # index into the sorted category ids
    xywh: np.ndarray
    crowd: np.ndarray


def _read_boxes(coco: dict[str, Any], image_index: dict[int, int], label_of: dict[int, int]) -> _Boxes:
    anns = coco.get("annotations") or []
    return _Boxes(
        ids=np.array([a.get("id", i) for i, a in enumerate(anns)], dtype=object),
        image=np.array([image_index[a["image_id"]] for a in anns], dtype=np.int64),
        label=np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64),
        xywh=np.array([[float(v) for v in a["bbox"]] for a in anns], dtype=np.float64).reshape(-1, 4),
        crowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
    )


@dataclass
class _Geometry:
    """Where each box lies against its image, and its size at the model's input."""

    width: np.ndarray  # of the box's image
    height: np.ndarray
    degenerate: np.ndarray  # zero width or height
    wholly: np.ndarray  # entirely outside its image
    partly: np.ndarray  # beyond its image by more than OUTSIDE_TOLERANCE
    overrun: np.ndarray  # pixels beyond the image
    valid: np.ndarray  # what training keeps: neither degenerate, wholly outside nor crowd
    side: np.ndarray  # sqrt of the area inside the image, at the input size


def _geometry(boxes: _Boxes, hw: np.ndarray, image_size: int) -> _Geometry:
    x0, y0 = boxes.xywh[:, 0], boxes.xywh[:, 1]
    x1, y1 = x0 + boxes.xywh[:, 2], y0 + boxes.xywh[:, 3]
    h, w = hw[boxes.image, 0], hw[boxes.image, 1]
    degenerate = (boxes.xywh[:, 2] <= 0) | (boxes.xywh[:, 3] <= 0)
    inside_w = np.minimum(x1, w) - np.maximum(x0, 0)
    inside_h = np.minimum(y1, h) - np.maximum(y0, 0)
    wholly = ~degenerate & ((inside_w <= 0) | (inside_h <= 0))
    overrun = np.stack([-x0, -y0, x1 - w, y1 - h], 1).max(1)
    scale = image_size / hw.max(1)
    side = np.sqrt(np.clip(inside_w, 0, None) * np.clip(inside_h, 0, None)) * scale[boxes.image]
    return _Geometry(w, h, degenerate, wholly, ~degenerate & ~wholly & (overrun > OUTSIDE_TOLERANCE), overrun,
                     ~degenerate & ~wholly & ~boxes.crowd, side)


def _box_problems(boxes: _Boxes, geo: _Geometry, where: list[str], smallest: float, image_size: int) -> list[Problem]:
    """Degenerate boxes, boxes outside their image and boxes under the smallest anchor, each named."""
    problems = [Problem("degenerate_box", f"{where[i]}: bbox {boxes.xywh[i].tolist()} has zero width or height "
                                          "(training drops it)") for i in np.flatnonzero(geo.degenerate)]
    for i in np.flatnonzero(geo.wholly | geo.partly):
        size = f"{geo.width[i]:.0f}x{geo.height[i]:.0f} (WxH) image"
        what = "lies entirely outside" if geo.wholly[i] else f"extends {geo.overrun[i]:.0f} px beyond"
        action = "drops" if geo.wholly[i] else "clips"
        problems.append(Problem("outside_box", f"{where[i]}: bbox {boxes.xywh[i].tolist()} {what} the {size} "
                                               f"(training {action} it)"))
    problems += [Problem("small_box", f"{where[i]}: {boxes.xywh[i, 2]:.0f}x{boxes.xywh[i, 3]:.0f} px, "
                                      f"{geo.side[i]:.1f} px (sqrt of the area) at the {image_size} px input, under "
                                      f"the smallest anchor ({smallest:g} px)")
                 for i in np.flatnonzero(geo.valid & (geo.side < smallest))]
    return problems


def _class_lines(names: list[str], cat_ids: list[int], box_count: np.ndarray, image_count: np.ndarray,
                 shown: int = 8) -> list[str]:
    order = np.argsort(-box_count, kind="stable")
    lines = [f"{names[c]:<20} {image_count[c]:>6} images {box_count[c]:>7} boxes  (id {cat_ids[c]})"
             for c in order[:shown]]
    if len(order) > shown:
        lines.append(f"... {len(order) - shown} more (classes.png, report.json)")
    return [f"{len(cat_ids)} categories, by box count:", *lines]


def _charts(out_dir: Path, split: str, names: list[str], box_count: np.ndarray, image_count: np.ndarray,
            per_image: np.ndarray, sizes_in: np.ndarray, aspect: np.ndarray, setting: AnchorSetting,
            geometry: AnchorGeometry, image_size: int) -> list[str]:
    """The report's charts; returns their file names."""
    bar_chart(out_dir / "classes.png", names, {"boxes": box_count.tolist(), "images": image_count.tolist()},
              f"{split}: boxes and images per class", "count", log=True)
    histogram(out_dir / "boxes_per_image.png", per_image, np.arange(per_image.max(initial=0) + 2) - 0.5,
              f"{split}: boxes per image", "boxes")
    anchor_sides = [setting.anchor_scale * 2.0**level for level in range(geometry.min_level, geometry.max_level + 1)]
    low, high = (float(sizes_in.min()), float(sizes_in.max())) if len(sizes_in) else (1.0, 2.0)
    bins = np.geomspace(max(0.5, low), max(2 * low, high, 1.0), 40)
    histogram(out_dir / "box_sizes.png", sizes_in, bins, f"{split}: box size at the {image_size} px input",
              "sqrt(area), px", anchor_sides, "anchor size per level (octave scale 0)", log_x=True)
    histogram(out_dir / "aspect_ratios.png", np.log2(aspect) if len(aspect) else aspect, 40,
              f"{split}: box aspect ratio", "log2(w / h)", [math.log2(a / b) for a, b in setting.aspect_ratios],
              "anchor aspect ratios")
    return ["classes.png", "boxes_per_image.png", "box_sizes.png", "aspect_ratios.png"]


def inspect_detection(dataset: CocoDetection, split: str, model_cfg: Any, image_size: int, out_dir: Path,
                      samples: int = 16, name: str = "") -> Inspection:
    """Inspect the json and images of a COCO-format ``dataset`` (see the package docstring) for a model of
    ``model_cfg`` trained at ``image_size``; the report goes to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    coco = json.loads(dataset.ann_file.read_text(encoding="utf-8"))  # as written: CocoDetection cleaned its copy
    images = coco["images"]
    cat_ids, names = list(dataset.cat_ids), list(dataset.class_names)
    boxes = _read_boxes(coco, {im["id"]: i for i, im in enumerate(images)}, {c: i for i, c in enumerate(cat_ids)})
    file_names = [str(im["file_name"]) for im in images]
    hw = np.array([[im["height"], im["width"]] for im in images], dtype=np.float64).reshape(-1, 2)
    report = Inspection(f"densekit inspect: {name or 'data'}, split {split}: {dataset.ann_file} ({len(images)} images "
                        f"under {dataset.image_dir})", out_dir)
    problems = report.problems
    problems += file_problems(dataset.listed_files(split))  # header sizes against the json, then duplicates
    problems += duplicate_files([dataset.image_dir / n for n in file_names],
                                lambda p: str(p.relative_to(dataset.image_dir)))
    geo = _geometry(boxes, hw, image_size)
    setting, geometry = AnchorSetting.of(model_cfg.anchors), AnchorGeometry.of(model_cfg, image_size)
    smallest = geometry.smallest_anchor(setting)
    where = [f"annotation {aid} in {file_names[i]}" for aid, i in zip(boxes.ids, boxes.image)]
    problems += _box_problems(boxes, geo, where, smallest, image_size)
    valid = geo.valid
    per_image = np.bincount(boxes.image[valid], minlength=len(images))
    empty = np.flatnonzero(per_image == 0)
    box_count = np.bincount(boxes.label[valid], minlength=len(cat_ids))
    image_count = np.array([len(set(boxes.image[valid & (boxes.label == c)].tolist())) for c in range(len(cat_ids))])
    if dataset.has_annotations:  # an image-info json (test-dev) has no boxes to miss
        problems += [Problem("empty_image", f"{file_names[i]} (image id {images[i]['id']}) has no boxes")
                     for i in empty]
        problems += [Problem("class_without_boxes", f"category {cat_ids[c]} {names[c]!r} has no boxes in {split}")
                     for c in np.flatnonzero(box_count == 0)]
    input_boxes = boxes_at_input_size(coco, image_size, max_boxes=ANCHOR_BOXES)
    fit = fit_anchors(input_boxes, model_cfg, image_size)
    if len(input_boxes) and fit.current.recall < WARN_BELOW:
        problems.append(Problem("low_anchor_recall", f"anchor recall {fit.current.recall:.3f} at IoU >= "
                                                     f"{geometry.match_iou:g}: see the anchors section"))
    sizes_in = geo.side[valid]
    aspect = (boxes.xywh[valid, 2] / boxes.xywh[valid, 3]) if valid.any() else np.zeros(0)
    report.sections = [
        ("classes", _class_lines(names, cat_ids, box_count, image_count)),
        ("boxes", [f"{int(valid.sum())} boxes ({int(boxes.crowd.sum())} crowd regions aside) in "
                   f"{int((per_image > 0).sum())} images; per image {percentiles(per_image)}, max "
                   f"{int(per_image.max(initial=0))}; images without boxes: {len(empty)}"]),
        ("sizes", [f"at the {image_size} px input: sqrt(area) {percentiles(sizes_in)} px; "
                   f"{int((sizes_in < smallest).sum())} under the smallest anchor ({smallest:g} px)",
                   f"aspect w/h {percentiles(aspect, '.2f')}"]),
        ("anchors", format_anchor_fit(fit)),
    ]
    report.stats = {
        "split": split, "annotations": str(dataset.ann_file), "images": len(images), "boxes": int(valid.sum()),
        "crowd": int(boxes.crowd.sum()), "input_size": image_size, "smallest_anchor": smallest,
        "classes": [{"id": cat_ids[c], "name": names[c], "images": int(image_count[c]), "boxes": int(box_count[c])}
                    for c in range(len(cat_ids))],
        "boxes_per_image": {str(k): int(v) for k, v in enumerate(np.bincount(per_image))},
        "anchors": {"boxes": fit.boxes, "match_iou": geometry.match_iou, "recall": fit.current.recall,
                    "suggestions": [{"what": s.what, "recall": s.recall, "overrides": s.setting.overrides()}
                                    for s in fit.suggestions]},
    }
    report.files = _charts(out_dir, split, names, box_count, image_count, per_image, sizes_in, aspect, setting,
                           geometry, image_size)

    def draw(i: int) -> tuple[np.ndarray, str] | None:
        try:
            image = decode_file(dataset.image_dir / file_names[i], exif=dataset.exif)
        except OSError:
            return None  # listed as unreadable
        small, factor = fit_tile(image, TILE)
        mine = np.flatnonzero((boxes.image == i) & ~geo.degenerate)
        xyxy = np.concatenate([boxes.xywh[mine, :2], boxes.xywh[mine, :2] + boxes.xywh[mine, 2:]], 1) * factor
        drawn = draw_detections(small, xyxy, np.ones(len(mine)), boxes.label[mine], names, score_threshold=0.0)
        return drawn, file_names[i]

    flagged = [int(boxes.image[i]) for i in np.flatnonzero(geo.wholly | geo.partly | (valid & (geo.side < smallest)))]
    sample_mosaic(sample_order(len(images), flagged, samples), draw, out_dir / "samples.jpg")
    report.files.append("samples.jpg")
    report.write()
    return report
