"""What is in a dataset and what is wrong with it, as the files have it (``densekit inspect``).

A detection dataset is read from its json as written (not from the cleaned training samples: a box the loader clips
or drops is reported as it is in the file): images and boxes per class, boxes per image, box sizes and aspect ratios at
the model's input size, the model's anchor recall and anchors fitted to the boxes
(:mod:`densekit.modeling.anchor_fit`), and the problems:

======================  ===========================================================================================
``unreadable_image``    image files that are missing, empty or not images (:mod:`densekit.data.checks`)
``size_mismatch``       a json size (a label's size) that disagrees with the image file's header
``duplicate_file``      files with the same content (SHA-1), or one file listed twice
``empty_image``         images without boxes (crowd regions aside)
``degenerate_box``      boxes of zero width or height (training drops them)
``outside_box``         boxes wholly, or by more than 1 px partly, outside their image (training drops / clips them)
``small_box``           boxes smaller than the smallest anchor at the input size (square root of the area)
``class_without_boxes`` categories that no box has
``low_anchor_recall``   anchor recall below :data:`~densekit.modeling.anchor_fit.WARN_BELOW`
``label_values``        segmentation label values that are neither classes nor the ignore value
``class_without_pixels`` segmentation classes that no label pixel has
======================  ===========================================================================================

A segmentation dataset reports each class's share of the labelled pixels and the images that hold it. Both write a
report folder: ``summary.txt`` (the one-screen summary), ``problems.txt`` (every problem), ``report.json`` (the
numbers), PNG charts (matplotlib, Agg) and ``samples.jpg``, a mosaic of sample images with their boxes or labels.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..checkpoint.io import atomic_write
from ..modeling.anchor_fit import (
    WARN_BELOW, AnchorGeometry, AnchorSetting, boxes_at_input_size, fit_anchors, format_anchor_fit,
)
from ..utils.files import atomic_save_json
from ..utils.visualize import draw_detections, overlay_segmentation
from .checks import DatasetFiles, find_problems
from .coco import CocoDetection
from .decode import decode_file
from .seg_dataset import SegmentationDataset
from .seg_transforms import IGNORE_INDEX

__all__ = ["KINDS", "DatasetProblems", "Inspection", "Problem", "inspect_detection", "inspect_segmentation"]

#: Every problem kind, with what it means (the summary and ``inspect.allow`` name them).
KINDS: dict[str, str] = {
    "unreadable_image": "image files that are missing, empty or not images",
    "size_mismatch": "sizes in the annotations that disagree with the image file",
    "duplicate_file": "files with the same content, or listed twice",
    "empty_image": "images without boxes",
    "degenerate_box": "boxes of zero width or height",
    "outside_box": "boxes outside their image",
    "small_box": "boxes smaller than the smallest anchor",
    "class_without_boxes": "categories without boxes",
    "low_anchor_recall": f"anchor recall below {WARN_BELOW}",
    "label_values": "label values that are neither classes nor ignore",
    "class_without_pixels": "classes without labelled pixels",
}
#: Boxes the anchor section compares (a seeded random subset of larger datasets).
ANCHOR_BOXES = 5000
#: Problems of a kind the summary shows (problems.txt has them all).
EXAMPLES = 2
#: A box may overrun its image by this much (pixels) before it counts as outside: rounding in converted datasets.
OUTSIDE_TOLERANCE = 1.0
#: Side of a tile of the sample mosaic, in pixels.
TILE = 256
_THREADS = 8


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the dataset: its kind (a key of :data:`KINDS`) and a line naming the file / annotation."""

    kind: str
    message: str


class DatasetProblems(ValueError):
    """``inspect.strict=true`` and the dataset has problems; the message lists them (a user error: exit code 2)."""


@dataclass
class Inspection:
    """The result of an inspection: the summary's sections, the problems, the numbers and the report folder."""

    title: str
    out_dir: Path
    sections: list[tuple[str, list[str]]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def kinds(self) -> Counter[str]:
        """How many problems of each kind, in :data:`KINDS` order."""
        counts = Counter(p.kind for p in self.problems)
        return Counter({k: counts[k] for k in KINDS if counts[k]})

    def problem_lines(self, problems: Sequence[Problem] | None = None, examples: int | None = EXAMPLES) -> list[str]:
        """``kind (count): first message`` per kind, with up to ``examples`` messages (``None``: all)."""
        problems = self.problems if problems is None else problems
        by_kind: dict[str, list[Problem]] = defaultdict(list)
        for p in problems:
            by_kind[p.kind].append(p)
        lines = []
        for kind in KINDS:
            found = by_kind.get(kind, [])
            if not found:
                continue
            lines.append(f"{kind} ({len(found)}): {KINDS[kind]}")
            shown = found if examples is None else found[:examples]
            lines += [f"    {p.message}" for p in shown]
            if len(found) > len(shown):
                lines.append(f"    ... and {len(found) - len(shown)} more")
        return lines

    def summary(self) -> str:
        """The one-screen summary: every section, the problems by kind with examples, the report folder."""
        width = max([len(name) for name, _ in self.sections] + [8])
        out = [self.title]
        for name, lines in self.sections:
            for i, line in enumerate(lines):
                out.append(f"{name if i == 0 else '':<{width}}  {line}")
        problems = self.problem_lines()
        kinds = self.kinds()
        head = (f"{len(self.problems)} of {len(kinds)} kind{'s' if len(kinds) != 1 else ''} (every one in "
                "problems.txt)" if problems else "none found")
        for i, line in enumerate([head, *problems]):
            out.append(f"{'problems' if i == 0 else '':<{width}}  {line}")
        out.append(f"{'report':<{width}}  {self.out_dir}/ ({', '.join(self.files)})")
        return "\n".join(out)

    def check(self, allow: Iterable[str] = ()) -> None:
        """Raise :class:`DatasetProblems` listing the problems whose kind is not in ``allow``."""
        allowed = set(allow)
        unknown = sorted(allowed - set(KINDS))
        if unknown:
            raise ValueError(f"inspect.allow: unknown problem kinds {unknown}; known: {', '.join(KINDS)}")
        failing = [p for p in self.problems if p.kind not in allowed]
        if not failing:
            return
        kinds = sorted({p.kind for p in failing}, key=list(KINDS).index)
        raise DatasetProblems("\n".join([
            f"inspect.strict=true: {self.title.split(': ', 1)[-1]} has {len(failing)} problems "
            f"({', '.join(kinds)}):",
            *self.problem_lines(failing, examples=5),
            f"every problem: {self.out_dir / 'problems.txt'}; to let a kind pass: inspect.allow=[{kinds[0]},...]",
        ]))

    def write(self) -> None:
        """summary.txt, problems.txt and report.json in :attr:`out_dir` (the charts are written as they are made)."""
        self.files = [*self.files, "summary.txt", "problems.txt", "report.json"]
        with atomic_write(self.out_dir / "problems.txt", "w") as f:
            f.write("".join(f"{p.kind}\t{p.message}\n" for p in self.problems))
        atomic_save_json({**self.stats, "problems": {k: [p.message for p in self.problems if p.kind == k]
                                                     for k in self.kinds()}}, self.out_dir / "report.json")
        with atomic_write(self.out_dir / "summary.txt", "w") as f:
            f.write(self.summary() + "\n")


# --- shared: files, charts, mosaic ------------------------------------------------------------------------------


def _sha1(path: Path) -> str | None:
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None  # reported as unreadable by the header check
    return digest.hexdigest()


def duplicate_files(paths: Sequence[Path], name: Callable[[Path], str] = str) -> list[Problem]:
    """One ``duplicate_file`` problem per group of files with the same content, and per file listed more than once;
    ``name`` words a path for the message."""
    problems = [Problem("duplicate_file", f"{name(path)} is listed {count} times")
                for path, count in Counter(paths).items() if count > 1]
    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(_THREADS, thread_name_prefix="inspect-hash") as pool:
        digests = list(pool.map(_sha1, unique))
    groups: dict[str, list[Path]] = defaultdict(list)
    for path, digest in zip(unique, digests):
        if digest is not None:
            groups[digest].append(path)
    for digest, group in groups.items():
        if len(group) > 1:
            problems.append(Problem("duplicate_file", f"{', '.join(name(p) for p in group)} have the same content "
                                                      f"(SHA-1 {digest[:12]})"))
    return problems


def file_problems(files: DatasetFiles) -> list[Problem]:
    """The header check of :mod:`densekit.data.checks`: unreadable files, and sizes that disagree with the file."""
    return [Problem("unreadable_image" if p.unreadable else "size_mismatch", p.message) for p in find_problems(files)]


def _save_figure(fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())


def _figure(width: float = 7.0, height: float = 4.0) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # late: only the report draws; no pyplot, no global backend state

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def bar_chart(path: Path, names: Sequence[str], series: dict[str, Sequence[float]], title: str, xlabel: str,
              log: bool = False) -> None:
    """Horizontal bars, one group per name, one bar per series."""
    fig, ax = _figure(7.0, max(3.0, 0.3 * len(names) * max(1, len(series)) + 1.6))
    y = np.arange(len(names))
    height = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        ax.barh(y + i * height, values, height, label=label)
    ax.set_yticks(y + height * (len(series) - 1) / 2, list(names))
    ax.invert_yaxis()
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in series.values()])
    positive = values[values > 0]
    if log and len(positive) and positive.max() > 50 * positive.min():  # linear unless the counts span decades
        ax.set_xscale("symlog")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if len(series) > 1:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(series), frameon=False)
    _save_figure(fig, path)


def histogram(path: Path, values: np.ndarray, bins: Any, title: str, xlabel: str, marks: Sequence[float] = (),
              mark_label: str = "", log_x: bool = False) -> None:
    """A histogram of ``values``, with dashed vertical lines at ``marks`` (e.g. the anchor sizes)."""
    fig, ax = _figure()
    ax.hist(values, bins=bins, color="#4477aa")
    for i, mark in enumerate(marks):
        ax.axvline(mark, color="#cc3311", linestyle="--", linewidth=1, label=mark_label if i == 0 else None)
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if marks and mark_label:
        ax.legend()
    _save_figure(fig, path)


def _fit(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    scale = size / max(image.shape[:2])
    h, w = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR), scale


def mosaic(tiles: Sequence[tuple[np.ndarray, str]], path: Path) -> None:
    """BGR tiles (at most :data:`TILE` a side) in a near-square grid, each captioned, written as a JPEG."""
    cols = max(1, math.ceil(math.sqrt(len(tiles))))
    rows = max(1, math.ceil(len(tiles) / cols))
    canvas = np.full((rows * TILE, cols * TILE, 3), 32, np.uint8)
    for i, (tile, caption) in enumerate(tiles):
        y, x = (i // cols) * TILE, (i % cols) * TILE
        canvas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
        for color, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):
            cv2.putText(canvas, caption[-40:], (x + 3, y + TILE - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, thickness,
                        cv2.LINE_AA)
    ok, encoded = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:  # pragma: no cover
        raise OSError(f"could not encode {path}")
    with atomic_write(path) as f:
        f.write(encoded.tobytes())


def _sample_order(count: int, first: Iterable[int], samples: int) -> list[int]:
    """Up to ``samples`` indices: ``first`` (items with problems) then a seeded random draw of the rest."""
    chosen = list(dict.fromkeys(i for i in first if 0 <= i < count))[: samples // 2]
    rest = [int(i) for i in np.random.default_rng(0).permutation(count) if int(i) not in chosen]
    return (chosen + rest)[:samples]


def _percentiles(values: np.ndarray, spec: str = ".0f") -> str:
    if len(values) == 0:
        return "-"
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    return f"median {p50:{spec}} (5-95%: {p5:{spec}}-{p95:{spec}})"


# --- detection ----------------------------------------------------------------------------------------------------


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


def inspect_detection(dataset: CocoDetection, split: str, model_cfg: Any, image_size: int, out_dir: Path,
                      samples: int = 16, name: str = "") -> Inspection:
    """Inspect the json and images of a COCO-format ``dataset`` (see the module docstring) for a model of
    ``model_cfg`` trained at ``image_size``; the report goes to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    coco = json.loads(dataset.ann_file.read_text(encoding="utf-8"))  # as written: CocoDetection cleaned its copy
    images = coco["images"]
    image_index = {im["id"]: i for i, im in enumerate(images)}
    cat_ids = list(dataset.cat_ids)
    label_of = {c: i for i, c in enumerate(cat_ids)}
    names = list(dataset.class_names)
    boxes = _read_boxes(coco, image_index, label_of)
    file_names = [str(im["file_name"]) for im in images]
    hw = np.array([[im["height"], im["width"]] for im in images], dtype=np.float64).reshape(-1, 2)
    where = [f"annotation {aid} in {file_names[i]}" for aid, i in zip(boxes.ids, boxes.image)]
    report = Inspection(f"densekit inspect: {name or 'data'}, split {split}: {dataset.ann_file} ({len(images)} images "
                        f"under {dataset.image_dir})", out_dir)
    problems = report.problems

    # Files: header sizes against the json, then duplicates.
    problems += file_problems(dataset.listed_files(split))
    problems += duplicate_files([dataset.image_dir / n for n in file_names],
                                lambda p: str(p.relative_to(dataset.image_dir)))

    # Boxes as written.
    x0, y0 = boxes.xywh[:, 0], boxes.xywh[:, 1]
    x1, y1 = x0 + boxes.xywh[:, 2], y0 + boxes.xywh[:, 3]
    h, w = hw[boxes.image, 0], hw[boxes.image, 1]
    degenerate = (boxes.xywh[:, 2] <= 0) | (boxes.xywh[:, 3] <= 0)
    inside_w = np.minimum(x1, w) - np.maximum(x0, 0)
    inside_h = np.minimum(y1, h) - np.maximum(y0, 0)
    wholly = ~degenerate & ((inside_w <= 0) | (inside_h <= 0))
    overrun = np.stack([-x0, -y0, x1 - w, y1 - h], 1).max(1)
    partly = ~degenerate & ~wholly & (overrun > OUTSIDE_TOLERANCE)
    for i in np.flatnonzero(degenerate):
        problems.append(Problem("degenerate_box", f"{where[i]}: bbox {boxes.xywh[i].tolist()} has zero width or "
                                                  "height (training drops it)"))
    for i in np.flatnonzero(wholly | partly):
        size = f"{w[i]:.0f}x{h[i]:.0f} (WxH) image"
        what = "lies entirely outside" if wholly[i] else f"extends {overrun[i]:.0f} px beyond"
        action = "drops" if wholly[i] else "clips"
        problems.append(Problem("outside_box", f"{where[i]}: bbox {boxes.xywh[i].tolist()} {what} the {size} "
                                               f"(training {action} it)"))
    scale = image_size / hw.max(1)
    valid = ~degenerate & ~wholly & ~boxes.crowd
    side = np.sqrt(np.clip(inside_w, 0, None) * np.clip(inside_h, 0, None)) * scale[boxes.image]
    setting = AnchorSetting.of(model_cfg.anchors)
    geometry = AnchorGeometry.of(model_cfg, image_size)
    smallest = geometry.smallest_anchor(setting)
    for i in np.flatnonzero(valid & (side < smallest)):
        problems.append(Problem("small_box", f"{where[i]}: {boxes.xywh[i, 2]:.0f}x{boxes.xywh[i, 3]:.0f} px, "
                                             f"{side[i]:.1f} px (sqrt of the area) at the {image_size} px input, under "
                                             f"the smallest anchor ({smallest:g} px)"))
    per_image = np.bincount(boxes.image[valid], minlength=len(images))
    empty = np.flatnonzero(per_image == 0)
    box_count = np.bincount(boxes.label[valid], minlength=len(cat_ids))
    image_count = np.array([len(set(boxes.image[valid & (boxes.label == c)].tolist())) for c in range(len(cat_ids))])
    if dataset.has_annotations:  # an image-info json (test-dev) has no boxes to miss
        problems += [Problem("empty_image", f"{file_names[i]} (image id {images[i]['id']}) has no boxes")
                     for i in empty]
        problems += [Problem("class_without_boxes", f"category {cat_ids[c]} {names[c]!r} has no boxes in {split}")
                     for c in np.flatnonzero(box_count == 0)]

    # Anchors.
    input_boxes = boxes_at_input_size(coco, image_size, max_boxes=ANCHOR_BOXES)
    fit = fit_anchors(input_boxes, model_cfg, image_size)
    if len(input_boxes) and fit.current.recall < WARN_BELOW:
        problems.append(Problem("low_anchor_recall", f"anchor recall {fit.current.recall:.3f} at IoU >= "
                                                     f"{geometry.match_iou:g}: see the anchors section"))

    # Summary and numbers.
    order = np.argsort(-box_count, kind="stable")
    shown = 8
    class_lines = [f"{names[c]:<20} {image_count[c]:>6} images {box_count[c]:>7} boxes  (id {cat_ids[c]})"
                   for c in order[:shown]]
    if len(order) > shown:
        class_lines.append(f"... {len(order) - shown} more (classes.png, report.json)")
    sizes_in = side[valid]
    aspect = (boxes.xywh[valid, 2] / boxes.xywh[valid, 3]) if valid.any() else np.zeros(0)
    report.sections = [
        ("classes", [f"{len(cat_ids)} categories, by box count:", *class_lines]),
        ("boxes", [f"{int(valid.sum())} boxes ({int(boxes.crowd.sum())} crowd regions aside) in "
                   f"{int((per_image > 0).sum())} images; per image {_percentiles(per_image)}, max "
                   f"{int(per_image.max(initial=0))}; images without boxes: {len(empty)}"]),
        ("sizes", [f"at the {image_size} px input: sqrt(area) {_percentiles(sizes_in)} px; "
                   f"{int((sizes_in < smallest).sum())} under the smallest anchor ({smallest:g} px)",
                   f"aspect w/h {_percentiles(aspect, '.2f')}"]),
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

    # Charts and samples.
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
    flagged = [int(boxes.image[i]) for i in np.flatnonzero((wholly | partly | (valid & (side < smallest))))]
    tiles = []
    for i in _sample_order(len(images), flagged, samples):
        try:
            image = decode_file(dataset.image_dir / file_names[i], exif=dataset.exif)
        except OSError:
            continue  # listed as unreadable
        small, factor = _fit(image, TILE)
        mine = np.flatnonzero((boxes.image == i) & ~degenerate)
        xyxy = np.concatenate([boxes.xywh[mine, :2], boxes.xywh[mine, :2] + boxes.xywh[mine, 2:]], 1) * factor
        drawn = draw_detections(small, xyxy, np.ones(len(mine)), boxes.label[mine], names, score_threshold=0.0)
        tiles.append((drawn, file_names[i]))
    mosaic(tiles, out_dir / "samples.jpg")
    report.files = ["classes.png", "boxes_per_image.png", "box_sizes.png", "aspect_ratios.png", "samples.jpg"]
    report.write()
    return report


# --- segmentation -------------------------------------------------------------------------------------------------


def inspect_segmentation(dataset: SegmentationDataset, split: str, out_dir: Path, samples: int = 16,
                         name: str = "") -> Inspection:
    """Inspect the images and label files of a segmentation ``dataset``: each class's share of the labelled pixels and
    the images holding it, label values outside the classes (the dataset's own check: its ignore value is allowed),
    the header check and duplicate images; the report goes to ``out_dir``."""
    ignore_index = IGNORE_INDEX  # what the datasets' load_label gives unlabelled pixels, whatever the files store
    out_dir.mkdir(parents=True, exist_ok=True)
    count = len(dataset)
    paths = [dataset.image_path(i) for i in range(count)]
    root = Path(os.path.commonpath([p.parent for p in paths])) if paths else Path(".")
    report = Inspection(f"densekit inspect: {name or 'data'}, split {split}: {count} images under {root}", out_dir)
    problems = report.problems
    problems += file_problems(dataset.listed_files(split))
    problems += duplicate_files(paths, lambda p: str(p.relative_to(root)) if p.is_relative_to(root) else str(p))
    classes = list(dataset.class_names)
    pixels = np.zeros(256, np.int64)
    images_with = np.zeros(len(classes), np.int64)
    bad_labels: list[int] = []
    if dataset.has_labels:
        for i in range(count):
            try:
                label = dataset.load_label(i)  # class indices; ignore_index for unlabelled pixels
            except ValueError as error:  # values outside the classes (the dataset's own check, naming the file)
                problems.append(Problem("label_values", str(error)))
                bad_labels.append(i)
                continue
            except OSError:
                continue  # listed as unreadable by the header check
            counts = np.bincount(label.ravel(), minlength=256)
            pixels += counts
            images_with += counts[: len(classes)] > 0
    labelled = int(pixels[: len(classes)].sum())
    share = pixels[: len(classes)] / max(1, labelled)
    if dataset.has_labels:
        problems += [Problem("class_without_pixels", f"class {c} {classes[c]!r} has no labelled pixels in {split}")
                     for c in np.flatnonzero(pixels[: len(classes)] == 0)]
    order = np.argsort(-share, kind="stable")
    shown = 8
    lines = [f"{classes[c]:<20} {100 * share[c]:6.2f}% of labelled pixels, in {images_with[c]} images"
             for c in order[:shown]]
    if len(order) > shown:
        lines.append(f"... {len(order) - shown} more (class_pixels.png, report.json)")
    total = int(pixels.sum())
    report.sections = [
        ("classes", [f"{len(classes)} classes, by pixel share:", *lines] if dataset.has_labels else ["no labels"]),
        ("pixels", [f"{total} label pixels, {100 * pixels[ignore_index] / max(1, total):.2f}% ignore "
                    f"({ignore_index})"]),
    ]
    report.stats = {
        "split": split, "images": count, "pixels": total, "ignore": int(pixels[ignore_index]),
        "classes": [{"index": c, "name": classes[c], "pixels": int(pixels[c]), "share": float(share[c]),
                     "images": int(images_with[c])} for c in range(len(classes))],
    }
    bar_chart(out_dir / "class_pixels.png", classes, {"share of labelled pixels (%)": (100 * share).tolist()},
              f"{split}: class pixel frequencies", "% of labelled pixels", log=True)
    tiles = []
    for i in _sample_order(count, bad_labels, samples):
        try:
            image = decode_file(paths[i], exif=dataset.exif)
            label = dataset.load_label(i, (image.shape[0], image.shape[1])) if dataset.has_labels else None
        except (OSError, ValueError):
            continue  # listed above
        drawn = (overlay_segmentation(image, label, classes, ignore_index=ignore_index) if label is not None
                 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        tiles.append((_fit(drawn, TILE)[0], paths[i].name))
    mosaic(tiles, out_dir / "samples.jpg")
    report.files = ["class_pixels.png", "samples.jpg"]
    report.write()
    return report
