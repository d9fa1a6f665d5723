"""YOLO txt labels (one ``class cx cy w h`` line per box, normalised to the image size) to COCO json.

Layouts: ultralytics' ``images/<split>/x.jpg`` <-> ``labels/<split>/x.txt``, a flat ``images/`` + ``labels/`` pair,
or labels next to their images (pass the same folder twice); sub-folders mirror each other. Image sizes come from
the image headers. The conversion is ``x = (cx - w / 2) * W``, ``y = (cy - h / 2) * H``, ``w * W``, ``h * H`` in
float64, so the inverse gives the source values back to float precision. Images without a label file, or with an
empty one, are negatives: kept, with no boxes (ultralytics' "backgrounds"). A box that runs past the image
(``cx - w / 2 < 0`` and the like) is clipped to it and counted in the summary, as
:class:`~densekit.data.coco.CocoDetection` clips it for training, so evaluation scores the boxes training uses.
"""
from __future__ import annotations

from pathlib import Path

from .common import (
    IMAGE_SUFFIXES,
    Box,
    Conversion,
    ConversionError,
    ImageRecord,
    build_coco,
    clip_to_image,
    describe_box,
    finite_floats,
    image_size,
    relative_name,
)

# Where class names are looked for, in order, when none is given: ultralytics' data.yaml, LabelImg's classes.txt
# (written into the labels folder), darknet's obj.names.
CLASS_LIST_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "classes.txt", "obj.names")


def find_class_list(*folders: str | Path) -> Path:
    """The first of :data:`CLASS_LIST_NAMES` found in ``folders`` (searched in order).

    Raises:
        ConversionError: none found; the message lists where it looked.
    """
    for folder in folders:
        for name in CLASS_LIST_NAMES:
            if (Path(folder) / name).is_file():
                return Path(folder) / name
    raise ConversionError(
        f"no class list ({', '.join(CLASS_LIST_NAMES)}) in {[str(f) for f in folders]}; pass one with --classes"
    )


def yolo_to_coco(
    images_dir: str | Path,
    labels_dir: str | Path,
    class_names: list[str],
    first_id: int = 1,
    skip_bad: bool = False,
) -> Conversion:
    """Convert a YOLO image folder and its label folder into a COCO detection dict.

    Args:
        images_dir: The image root (searched recursively); ``file_name`` is relative to it.
        labels_dir: The label root: the labels of ``images_dir/sub/x.jpg`` are ``labels_dir/sub/x.txt``.
        class_names: Label ``i``'s name (from ``classes.txt``, ``obj.names`` or a ``data.yaml``).
        first_id: Category id of class 0.
        skip_bad: Skip (and report) malformed lines instead of raising.

    Returns:
        The :class:`Conversion`; unreadable images and label files without an image are in its ``skipped`` list.

    Raises:
        ConversionError: a folder is missing; a line is malformed (unless ``skip_bad``) or has a class id outside
            ``class_names`` (always: the class list is wrong); nothing was converted.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for what, folder in (("image", images_dir), ("label", labels_dir)):
        if not folder.is_dir():
            raise ConversionError(f"YOLO {what} folder {folder} does not exist")
    images = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    skipped: list[tuple[str, str]] = []
    clipped: list[str] = []
    records, used = [], set()
    for image in images:
        try:
            height, width = image_size(image)
        except OSError as err:
            skipped.append((str(image), str(err)))
            continue
        rec = ImageRecord(relative_name(image, images_dir), height, width)
        label = labels_dir / image.relative_to(images_dir).with_suffix(".txt")
        if label.is_file():
            used.add(label)
            rec.boxes = _read_labels(label, height, width, len(class_names), skip_bad, skipped, clipped)
        records.append(rec)
    for orphan in sorted(set(labels_dir.rglob("*.txt")) - used):
        if orphan.name not in CLASS_LIST_NAMES:
            skipped.append((str(orphan), f"no image of this name under {images_dir}"))
    if not records:
        raise ConversionError(f"no image converted from {images_dir}: {skipped[:3] or 'no image files found'}")
    return Conversion(build_coco(records, class_names, first_id), f"YOLO {images_dir}", images_dir, skipped, clipped)


def _read_labels(
    path: Path, height: int, width: int, num_classes: int, skip_bad: bool, skipped: list[tuple[str, str]],
    clipped: list[str],
) -> list[Box]:
    """The boxes of one label file, clipped to the image (where noted in ``clipped``); blank lines are allowed."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ConversionError(f"label file {path} is not UTF-8 text ({err})") from None
    boxes = []
    for number, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            label, xywh = _parse_line(tokens, height, width)
        except ValueError as err:
            if not skip_bad:
                raise ConversionError(f"{path}:{number}: {err}; fix it, or pass --skip-bad to skip bad lines") from None
            skipped.append((f"{path}:{number}", str(err)))
            continue
        if not 0 <= label < num_classes:
            raise ConversionError(
                f"{path}:{number}: class id {label} is out of range: the class list has {num_classes} names "
                f"(ids 0..{num_classes - 1}); use the class list these labels were made with"
            )
        box, changed = clip_to_image(xywh, height, width)
        if box is None:  # cannot happen for 0 <= cx, cy <= 1 with w, h > 0; kept for safety
            skipped.append((f"{path}:{number}", describe_box(xywh, height, width)))
            continue
        if changed:
            clipped.append(f"{path}:{number}")
        boxes.append(Box(label, box))
    return boxes


def _parse_line(tokens: list[str], height: int, width: int) -> tuple[int, tuple[float, float, float, float]]:
    """``(class id, absolute xywh)`` of one ``class cx cy w h`` line."""
    if len(tokens) != 5:
        hint = " (a segmentation polygon? only box labels are converted)" if len(tokens) > 5 and len(tokens) % 2 else ""
        raise ValueError(f"expected 5 values 'class cx cy w h', got {len(tokens)}{hint}: {' '.join(tokens)!r}")
    values = finite_floats(tokens)
    if values is None:
        raise ValueError(f"non-numeric value in {' '.join(tokens)!r}")
    label, cx, cy, w, h = values
    if not label.is_integer():
        raise ValueError(f"class id {tokens[0]!r} is not an integer")
    if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)) or w <= 0 or h <= 0:
        raise ValueError(
            f"cx cy w h must be normalised to [0, 1] with w, h > 0 (got {' '.join(tokens[1:])}): pixel coordinates?"
        )
    return int(label), ((cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height)
