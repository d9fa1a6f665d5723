"""Convert a Pascal VOC or YOLO detection dataset to a COCO json, so it trains and evaluates (pycocotools) as any
COCO-format dataset does.

Usage::

    densekit convert --from voc --root VOCdevkit/VOC2007 --split trainval --out voc07_trainval.json
    densekit convert --from voc --root my_voc --classes classes.txt --difficult keep --out all.json
    densekit convert --from yolo --root coco8 --split train --out coco8_train.json
    densekit convert --from yolo --images photos --labels photos --classes obj.names --out all.json

Defaults under ``--root``: VOC ``Annotations/`` (xml), ``JPEGImages/`` (images), ``ImageSets/Main/<split>.txt``
(the split's image ids, or ``--split`` names a list file itself); YOLO ``images[/<split>]/`` and
``labels[/<split>]/``, class names from ``data.yaml`` / ``classes.txt`` / ``obj.names`` in the root, the label or the
image folder. ``--images`` / ``--labels`` override the folders. The conversion rules (coordinates, ``difficult``,
negatives) are in the docstrings of :mod:`densekit.data.converters.voc` and :mod:`densekit.data.converters.yolo`.
Boxes that run past their image are clipped to it, and boxes wholly outside it left out, as training does (the
summary counts both), so the json evaluation scores is the one training uses.
The json is written atomically; a one-screen summary is printed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from densekit.cli.errors import run_tool
from densekit.data.converters import (
    DIFFICULT_MODES,
    Conversion,
    ConversionError,
    find_class_list,
    read_class_names,
    voc_to_coco,
    write_coco,
    yolo_to_coco,
)

_HELP = __doc__.split("\n\n")[:4]  # summary, usage, examples, defaults: the --help text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=_HELP[0], epilog="\n\n".join(_HELP[1:]).replace("Usage::", "examples:").replace("``", ""),
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--from", dest="source", choices=("voc", "yolo"), required=True, help="source format")
    parser.add_argument("--out", type=Path, required=True, help="the COCO json to write")
    parser.add_argument("--root", type=Path, help="dataset root holding the default folders (below)")
    parser.add_argument("--split", help="VOC: ImageSets/Main/<SPLIT>.txt or a list file; YOLO: images/<SPLIT>/")
    parser.add_argument("--images", type=Path, help="image folder; file_name is relative to it")
    parser.add_argument("--labels", "--annotations", dest="labels", type=Path,
                        help="VOC: xml folder (default ROOT/Annotations);\n"
                             "YOLO: txt folder (default ROOT/labels[/SPLIT])")
    parser.add_argument("--classes", type=Path,
                        help="class names in id order: one per line, or a YOLO data.yaml with names:\n"
                             "(VOC default: the sorted names found in the xmls)")
    parser.add_argument("--first-id", type=int, default=1, help="category id of the first class (default 1)")
    parser.add_argument("--difficult", choices=DIFFICULT_MODES,
                        help="VOC difficult objects: ignore (iscrowd=1, the default, as mmdetection), keep, drop")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip and report malformed xml files, objects and label lines instead of stopping")
    args = parser.parse_args(argv)
    if args.first_id < 0:
        parser.error("--first-id must be >= 0")
    if args.difficult is not None and args.source != "voc":
        parser.error("--difficult applies to --from voc only")
    if args.root is None and (args.images is None or args.labels is None):
        parser.error("give --root, or both --images and --labels")
    return args


def _under_root(args: argparse.Namespace, given: Path | None, *parts: str) -> Path:
    """``given``, else ``ROOT/<parts>``."""
    if given is not None:
        return given
    if args.root is None:
        raise ConversionError(f"{'/'.join(parts)} is looked up under --root: give --root or the file itself")
    return args.root.joinpath(*parts)


def convert(args: argparse.Namespace) -> Conversion:
    """Resolve the folders from the arguments and run the converter."""
    if args.source == "voc":
        image_list = None
        if args.split:  # a list file, else the name of one under ROOT/ImageSets/Main
            named = Path(args.split)
            image_list = named if named.is_file() else _under_root(args, None, "ImageSets", "Main", f"{named}.txt")
        return voc_to_coco(
            _under_root(args, args.labels, "Annotations"),
            _under_root(args, args.images, "JPEGImages"),
            image_list=image_list,
            class_names=read_class_names(args.classes) if args.classes else None,
            first_id=args.first_id,
            difficult=args.difficult or "ignore",
            skip_bad=args.skip_bad,
        )
    split = [args.split] if args.split else []
    images = _under_root(args, args.images, "images", *split)
    labels = _under_root(args, args.labels, "labels", *split)
    folders = [f for f in (args.root, labels, images) if f is not None]
    classes = args.classes or find_class_list(*folders)
    return yolo_to_coco(images, labels, read_class_names(classes), first_id=args.first_id, skip_bad=args.skip_bad)


def convert_and_write(argv: list[str] | None = None) -> None:
    """Convert, write the json, print the summary."""
    args = parse_args(argv)
    conversion = convert(args)
    print(conversion.summary(write_coco(conversion, args.out)))


def main(argv: list[str] | None = None) -> None:
    """Entry point: a data or command-line mistake is one ``error:`` block, exit code 2 (densekit.cli.errors)."""
    run_tool(lambda: convert_and_write(argv))


if __name__ == "__main__":
    main()
