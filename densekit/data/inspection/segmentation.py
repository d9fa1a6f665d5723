"""``densekit inspect`` of a segmentation dataset: class pixel frequencies and label values (see the package
docstring)."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from ...utils.visualize import overlay_segmentation
from ..decode import decode_file
from ..seg_dataset import SegmentationDataset
from ..seg_transforms import IGNORE_INDEX
from .figures import TILE, bar_chart, fit_tile, sample_mosaic
from .report import Inspection, Problem, duplicate_files, file_problems, sample_order


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

    def draw(i: int) -> tuple[np.ndarray, str] | None:
        try:
            image = decode_file(paths[i], exif=dataset.exif)
            label = dataset.load_label(i, (image.shape[0], image.shape[1])) if dataset.has_labels else None
        except (OSError, ValueError):
            return None  # listed above
        drawn = (overlay_segmentation(image, label, classes, ignore_index=ignore_index) if label is not None
                 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        return fit_tile(drawn, TILE)[0], paths[i].name

    sample_mosaic(sample_order(count, bad_labels, samples), draw, out_dir / "samples.jpg")
    report.files = ["class_pixels.png", "samples.jpg"]
    report.write()
    return report
