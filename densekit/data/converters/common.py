"""What the VOC and YOLO converters share: the COCO json they build, class lists, image headers, the summary.

Both readers turn their format into :class:`ImageRecord` lists (boxes as absolute ``xywh`` floats in the stored
pixel frame, labels as indices into the class list) and :func:`build_coco` numbers them the way pycocotools expects:
image and annotation ids from 1 (COCOeval's matcher treats a ground-truth id of 0 as "unmatched"), category ids
from ``first_id`` in class-list order.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, UnidentifiedImageError

from ...utils.files import atomic_save_json
from ..media import IMAGE_SUFFIXES  # noqa: F401  (re-exported: the readers list image files with it)

# Formats cv2.imdecode reads, which is how densekit.data.decode.read_image loads them for training.


class ConversionError(ValueError):
    """A source dataset cannot be converted; the message names the file (and line or object) and what to do."""


@dataclass(frozen=True)
class Box:
    """One box: ``label`` indexes the class list; ``xywh`` is absolute pixels, top-left corner first."""

    label: int
    xywh: tuple[float, float, float, float]
    iscrowd: bool = False


@dataclass
class ImageRecord:
    """One image: ``file_name`` relative to the image root (``/``-separated), size in pixels, its boxes."""

    file_name: str
    height: int
    width: int
    boxes: list[Box] = field(default_factory=list)


@dataclass
class Conversion:
    """The result of a conversion: the COCO dict (class names in its ``categories``), a description of the source,
    the folder its ``file_name`` entries are relative to (the dataset's image folder for training), what was
    left out as ``(where, why)`` pairs, so a user sees every file or entry that is not in the json, and where the
    boxes that were clipped to their image are (see :func:`clip_to_image`)."""

    coco: dict[str, Any]
    source: str
    image_root: Path
    skipped: list[tuple[str, str]]
    clipped: list[str] = field(default_factory=list)  # where each box clipped to its image is (xml object, line)

    def summary(self, output: str | Path | None = None, max_skipped: int = 10) -> str:
        """A one-screen report: images, boxes per class, skipped files or entries with reasons, the output path."""
        images, anns = self.coco["images"], self.coco["annotations"]
        per_cat = Counter(a["category_id"] for a in anns)
        crowd = Counter(a["category_id"] for a in anns if a["iscrowd"])
        with_boxes = len({a["image_id"] for a in anns})
        lines = [f"converted {self.source}: {len(images)} images ({len(images) - with_boxes} without boxes), "
                 f"{len(anns)} boxes ({sum(crowd.values())} iscrowd=1)"]
        lines.append(f"  {'id':>4}  {'name':<24} {'boxes':>7} {'iscrowd':>8}")
        for cat in self.coco["categories"]:
            cid = cat["id"]
            lines.append(f"  {cid:>4}  {cat['name']:<24} {per_cat[cid]:>7} {crowd[cid]:>8}")
        if self.clipped:
            shown = ", ".join(self.clipped[:3]) + (", ..." if len(self.clipped) > 3 else "")
            lines.append(f"clipped {len(self.clipped)} boxes that ran past their image to it (e.g. {shown})")
        if self.skipped:
            outside = sum(why.startswith(OUTSIDE_REASON) for _, why in self.skipped)
            dropped = f" ({outside} boxes entirely outside their image)" if outside else ""
            lines.append(f"skipped {len(self.skipped)}{dropped}:")
            lines += [f"  {where}: {why}" for where, why in self.skipped[:max_skipped]]
            if len(self.skipped) > max_skipped:
                lines.append(f"  ... and {len(self.skipped) - max_skipped} more")
        lines.append(f"image folder (file_name is relative to it): {self.image_root}")
        if output is not None:
            lines.append(f"wrote {output}")
        return "\n".join(lines)


# The start of the ``skipped`` reason of a box that lies entirely outside its image (the summary counts them).
OUTSIDE_REASON = "box lies entirely outside its image"

# Edges past the image by at most this many pixels are float rounding (YOLO's normalised coordinates of a box that
# touches the border): clipped, but not reported.
_CLIP_TOLERANCE = 1e-6


def clip_to_image(xywh: tuple[float, float, float, float], height: int, width: int
                  ) -> tuple[tuple[float, float, float, float] | None, bool]:
    """``xywh`` clipped to the ``width`` x ``height`` image, as :class:`~densekit.data.coco.CocoDetection` clips
    boxes for training, so the json that evaluation scores holds the boxes that training uses.

    Returns:
        ``(box, changed)``: the clipped box, or ``None`` when clipping leaves nothing (the box lies entirely
        outside the image); ``changed`` is true when an edge moved by more than float rounding.
    """
    x, y, w, h = xywh
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x1 <= x0 or y1 <= y0:
        return None, True
    changed = max(abs(x0 - x), abs(y0 - y), abs(x1 - (x + w)), abs(y1 - (y + h))) > _CLIP_TOLERANCE
    if (x0, y0, x1, y1) == (x, y, x + w, y + h):
        return xywh, False  # inside: the source values exactly
    return (x0, y0, x1 - x0, y1 - y0), changed


def describe_box(xywh: tuple[float, float, float, float], height: int, width: int) -> str:
    """The ``skipped`` reason of a box that clipping empties."""
    x, y, w, h = xywh
    return (f"{OUTSIDE_REASON} (xmin={x:g}, ymin={y:g}, xmax={x + w:g}, ymax={y + h:g}; "
            f"the image is {height}x{width} HxW)")


def build_coco(records: list[ImageRecord], class_names: list[str], first_id: int = 1) -> dict[str, Any]:
    """The COCO detection dict of ``records``: images, annotations (``area`` = box area) and categories.

    Raises:
        ConversionError: two records name the same image file.
    """
    seen: set[str] = set()
    images, annotations = [], []
    for image_id, rec in enumerate(records, start=1):
        if rec.file_name in seen:
            raise ConversionError(f"image file {rec.file_name} is listed twice; each image must appear once")
        seen.add(rec.file_name)
        images.append({"id": image_id, "file_name": rec.file_name, "height": rec.height, "width": rec.width})
        for box in rec.boxes:
            x, y, w, h = box.xywh
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": box.label + first_id,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(box.iscrowd),
            })
    categories = [{"id": i + first_id, "name": name} for i, name in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(conversion: Conversion, path: str | Path) -> Path:
    """Write the COCO json atomically (a crash never leaves half a file); returns the path."""
    path = Path(path)
    atomic_save_json(conversion.coco, path)
    return path


def read_class_names(path: str | Path) -> list[str]:
    """Class names in label order from a text list (``classes.txt``, darknet ``obj.names``: one per line) or a
    YOLO ``data.yaml`` (``names:`` as a list, or a dict ``{0: a, 1: b}`` whose keys are ``0 .. n-1``).

    Raises:
        ConversionError: the file is missing or malformed, a name is empty, or names repeat.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"class list {path} does not exist")
    if path.suffix.lower() in (".yaml", ".yml"):
        names = _yaml_names(path)
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        while lines and not lines[-1].strip():  # trailing blank lines are common; inner ones would shift ids
            lines.pop()
        names = [line.strip() for line in lines]
        if "" in names:
            raise ConversionError(f"class list {path}: line {names.index('') + 1} is empty; one name per line")
    if not names:
        raise ConversionError(f"class list {path} holds no class names")
    repeated = sorted(n for n, c in Counter(names).items() if c > 1)
    if repeated:
        raise ConversionError(f"class list {path}: names {repeated} appear more than once")
    return names


def _yaml_names(path: Path) -> list[str]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConversionError(f"class list {path} is not valid YAML: {err}") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise ConversionError(f"{path}: the keys of 'names' must be the class ids 0..{len(names) - 1}, "
                                  f"got {sorted(names, key=str)}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not all(isinstance(n, (str, int)) and str(n).strip() for n in names):
        raise ConversionError(f"{path}: expected 'names:' as a list of class names or a dict {{id: name}}")
    nc = data.get("nc")
    if nc is not None and nc != len(names):
        raise ConversionError(f"{path}: nc is {nc} but 'names' lists {len(names)} classes")
    return [str(n).strip() for n in names]


#: EXIF orientations (tag 0x0112) that rotate by 90 degrees: the displayed frame swaps width and height.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def image_size(path: Path, exif: bool = True) -> tuple[int, int]:
    """``(height, width)`` of an image from its header only (PIL opens lazily; the pixels are not decoded).

    The size is the frame :func:`densekit.data.decode.read_image` loads: the displayed one, after the EXIF orientation
    (``exif=False``: the stored one).

    Raises:
        OSError: the file is not a readable image (message names it).
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            rotated = exif and im.getexif().get(0x0112) in _TRANSPOSING_ORIENTATIONS
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise OSError(f"cannot read image {path}: {err}") from None
    return (int(width), int(height)) if rotated else (int(height), int(width))


def finite_floats(values: list[str]) -> list[float] | None:
    """The values as floats, or ``None`` when one is not a finite number."""
    try:
        out = [float(v) for v in values]
    except ValueError:
        return None
    return out if all(math.isfinite(v) for v in out) else None


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with ``/`` separators: the COCO ``file_name`` (sub-folders allowed)."""
    return path.relative_to(root).as_posix()
