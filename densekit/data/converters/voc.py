"""Pascal VOC xml (``Annotations/*.xml`` + ``JPEGImages/``, optionally an ``ImageSets/Main/<split>.txt`` list) to
COCO json.

Coordinates are kept exactly as the xml gives them: ``bbox = [xmin, ymin, xmax - xmin, ymax - ymin]``, so the json
reproduces the source boxes to float precision and a box drawn from it lands where the annotation tool drew it.
A box that runs past its image is clipped to it and one wholly outside is left out (both counted in the summary),
as :class:`~densekit.data.coco.CocoDetection` does for training, so evaluation scores the boxes training uses.
VOC's own integers are 1-based inclusive pixel indices, and toolkits disagree on shifting them:

* detectron2 (``detectron2/data/datasets/pascal_voc.py``, ``load_voc_instances``) subtracts 1 from ``xmin`` and
  ``ymin`` only, reading ``[1, W]`` as the continuous interval ``[0, W]``; it keeps ``difficult`` objects.
* mmdetection 3.x (``mmdet/datasets/xml_style.py``, ``XMLDataset.parse_data_info``) truncates to integers and
  subtracts 1 from all four; difficult objects get ``ignore_flag=1``. Its COCO converter
  (``tools/dataset_converters/pascal_voc.py``) also subtracts 1 from all four and writes difficult objects with
  ``iscrowd=1``.

The difference is at most one pixel, below annotation noise, and applying neither keeps the conversion lossless for
xmls written by labelling tools (LabelImg, CVAT), whose coordinates are not VOC's 1-based indices. ``difficult``
objects follow mmdetection by default: ``iscrowd=1``, so training ignores anchors on them and COCOeval neither
rewards nor penalises detections of them.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

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

DIFFICULT_MODES = ("keep", "ignore", "drop")


class _Skip(Exception):
    """This xml is left out of the json for the reason in the message."""


@dataclass(frozen=True)
class _VocObject:
    name: str
    xyxy: tuple[float, float, float, float]
    difficult: bool
    number: int = 0  # 1-based position among the xml's <object>s (0: unknown)


def voc_to_coco(
    annotations_dir: str | Path,
    images_dir: str | Path,
    image_list: str | Path | None = None,
    class_names: list[str] | None = None,
    first_id: int = 1,
    difficult: str = "ignore",
    skip_bad: bool = False,
) -> Conversion:
    """Convert a folder of VOC xml files into a COCO detection dict.

    Args:
        annotations_dir: The xml folder (``Annotations/``); sub-folders are allowed and mirror the image folder.
        images_dir: The image root; ``file_name`` is relative to it. The image of ``sub/a.xml`` is
            ``sub/<filename from the xml>`` or ``sub/a.<jpg|png|...>``.
        image_list: An ``ImageSets/Main/<split>.txt`` file of image ids (one per line); default every xml.
        class_names: Fixes the categories' order and ids; default the sorted names found in the xmls.
        first_id: Category id of the first class.
        difficult: ``"ignore"`` (``iscrowd=1``, mmdetection's handling), ``"keep"`` (plain boxes) or ``"drop"``.
        skip_bad: Skip (and report) unparsable xmls and malformed objects instead of raising.

    Returns:
        The :class:`Conversion`; xmls without a readable image are in its ``skipped`` list.

    Raises:
        ConversionError: a folder is missing; an xml's ``<size>`` differs from its image file's; an object is
            malformed (unless ``skip_bad``); an object's class is not in ``class_names``; nothing was converted.
    """
    annotations_dir, images_dir = Path(annotations_dir), Path(images_dir)
    if difficult not in DIFFICULT_MODES:
        raise ConversionError(f"difficult={difficult!r}: expected one of {DIFFICULT_MODES}")
    for what, folder in (("annotation", annotations_dir), ("image", images_dir)):
        if not folder.is_dir():
            raise ConversionError(f"VOC {what} folder {folder} does not exist")
    skipped: list[tuple[str, str]] = []
    parsed: list[tuple[Path, ImageRecord, list[_VocObject]]] = []
    for xml in _xml_files(annotations_dir, image_list, skipped):
        try:
            parsed.append((xml, *_parse_xml(xml, annotations_dir, images_dir, skip_bad, skipped)))
        except _Skip as reason:
            skipped.append((str(xml), str(reason)))
    if not parsed:
        raise ConversionError(f"no image converted from {annotations_dir}: {skipped[:3] or 'no xml files found'}")
    names = list(class_names) if class_names else sorted({o.name for *_, objs in parsed for o in objs})
    index = {name: i for i, name in enumerate(names)}
    clipped: list[str] = []
    for xml, rec, objects in parsed:
        rec.boxes = _boxes(xml, rec, objects, index, difficult, skipped, clipped)
    coco = build_coco([rec for _, rec, _ in parsed], names, first_id)
    return Conversion(coco, f"Pascal VOC {annotations_dir}", images_dir, skipped, clipped)


def _boxes(
    xml: Path, rec: ImageRecord, objects: list[_VocObject], index: dict[str, int], difficult: str,
    skipped: list[tuple[str, str]], clipped: list[str],
) -> list[Box]:
    """The COCO boxes of one xml's objects: ``[xmin, ymin, xmax - xmin, ymax - ymin]`` clipped to the image (boxes
    clipping empties go to ``skipped``, clipped ones to ``clipped``), difficult ones as asked."""
    boxes = []
    for k, obj in enumerate(objects, start=1):
        if obj.name not in index:
            raise ConversionError(
                f"{xml}: class {obj.name!r} is not in the class list {list(index)}; add it to the list"
            )
        if obj.difficult and difficult == "drop":
            continue
        x0, y0, x1, y1 = obj.xyxy
        xywh, changed = clip_to_image((x0, y0, x1 - x0, y1 - y0), rec.height, rec.width)
        where = f"{xml} object {obj.number or k}"
        if xywh is None:
            skipped.append((where, describe_box((x0, y0, x1 - x0, y1 - y0), rec.height, rec.width)))
            continue
        if changed:
            clipped.append(where)
        boxes.append(Box(index[obj.name], xywh, iscrowd=obj.difficult and difficult == "ignore"))
    return boxes


def _xml_files(annotations_dir: Path, image_list: str | Path | None, skipped: list[tuple[str, str]]) -> list[Path]:
    """Every xml under ``annotations_dir`` (sorted), or the listed ones in list order (missing ones skipped)."""
    if image_list is None:
        return sorted(annotations_dir.rglob("*.xml"))
    image_list = Path(image_list)
    if not image_list.is_file():
        raise ConversionError(f"image list {image_list} does not exist")
    ids = [line.split()[0] for line in image_list.read_text(encoding="utf-8").splitlines() if line.strip()]
    files = []
    for image_id in ids:
        xml = annotations_dir / f"{image_id}.xml"
        if xml.is_file():
            files.append(xml)
        else:
            skipped.append((str(xml), f"listed in {image_list} but the xml does not exist"))
    return files


def _parse_xml(
    xml: Path, annotations_dir: Path, images_dir: Path, skip_bad: bool, skipped: list[tuple[str, str]]
) -> tuple[ImageRecord, list[_VocObject]]:
    """The image record (size checked against the image file) and the objects of one xml."""
    try:
        root = ET.parse(xml).getroot()
        size = _xml_size(root)
    except (ET.ParseError, ValueError) as err:
        if skip_bad:
            raise _Skip(f"malformed xml: {err}") from None
        raise ConversionError(f"{xml}: malformed xml ({err}); fix it, or pass --skip-bad to skip such files") from None
    image = _find_image(xml, root, annotations_dir, images_dir)
    try:
        file_size = image_size(image)
    except OSError as err:
        raise _Skip(str(err)) from None
    if size is not None and size != file_size:
        exif = (" (EXIF orientation rotates the photo: the xml was made on its stored frame, densekit reads the "
                "displayed one, as viewers show it; rotate the boxes, or save the photo without the EXIF rotation)"
                if size == file_size[::-1] else "")
        raise ConversionError(
            f"{xml}: <size> says {size[0]}x{size[1]} (HxW) but its image {image} is {file_size[0]}x{file_size[1]}"
            f"{exif}; the boxes would not fit the image: fix the xml's <size> or use the image it was annotated on"
        )
    objects = []
    for k, obj in enumerate(root.findall("object"), start=1):
        try:
            objects.append(_parse_object(obj, k))
        except ValueError as err:
            if not skip_bad:
                raise ConversionError(
                    f"{xml}: object {k}: {err}; fix it, or pass --skip-bad to skip malformed objects"
                ) from None
            skipped.append((f"{xml} object {k}", str(err)))
    rec = ImageRecord(relative_name(image, images_dir), file_size[0], file_size[1])
    return rec, objects


def _xml_size(root: ET.Element) -> tuple[int, int] | None:
    """``(height, width)`` from ``<size>``; ``None`` when absent or zero (some tools write 0: the file decides)."""
    height, width = root.findtext("size/height"), root.findtext("size/width")
    if height is None or width is None:
        return None
    try:
        h, w = int(float(height)), int(float(width))
    except ValueError:
        raise ValueError(f"<size> has a non-numeric height/width ({height!r}, {width!r})") from None
    return (h, w) if h > 0 and w > 0 else None


def _find_image(xml: Path, root: ET.Element, annotations_dir: Path, images_dir: Path) -> Path:
    """The image of ``xml``: in the mirrored sub-folder, by ``<filename>`` (its base name) or the xml's stem."""
    folder = images_dir / xml.parent.relative_to(annotations_dir)
    candidates = []
    tag = (root.findtext("filename") or "").strip()
    if tag:
        candidates.append(PureWindowsPath(tag).name)  # accepts / and \ separators: tools write absolute paths
    candidates += [xml.stem + s for suffix in IMAGE_SUFFIXES for s in (suffix, suffix.upper())]
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    tried = f"{tag!r} and " if tag else ""
    raise _Skip(f"no image file for it in {folder} (tried {tried}{xml.stem} with the suffixes {IMAGE_SUFFIXES})")


def _parse_object(obj: ET.Element, number: int = 0) -> _VocObject:
    name = (obj.findtext("name") or "").strip()
    if not name:
        raise ValueError("no <name>")
    box = obj.find("bndbox")
    texts = [box.findtext(k) if box is not None else None for k in ("xmin", "ymin", "xmax", "ymax")]
    values = finite_floats(texts) if None not in texts else None
    if values is None:
        raise ValueError(f"{name!r}: <bndbox> needs numeric xmin, ymin, xmax, ymax (got {texts})")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{name!r}: empty or inverted box xmin={x0}, ymin={y0}, xmax={x1}, ymax={y1}")
    flag = (obj.findtext("difficult") or "0").strip()
    if flag not in ("0", "1"):
        raise ValueError(f"{name!r}: <difficult> must be 0 or 1 (got {flag!r})")
    return _VocObject(name, (x0, y0, x1, y1), flag == "1", number)
