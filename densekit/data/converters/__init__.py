"""Converters from the detection formats users hold (Pascal VOC xml, YOLO txt) to COCO json, so a converted dataset
loads in :class:`~densekit.data.coco.CocoDetection` and evaluates with pycocotools like any COCO-format one.
``tools/convert_dataset.py`` is the command line."""
from .common import Conversion, ConversionError, read_class_names, write_coco
from .voc import DIFFICULT_MODES, voc_to_coco
from .yolo import CLASS_LIST_NAMES, find_class_list, yolo_to_coco

__all__ = [
    "CLASS_LIST_NAMES",
    "DIFFICULT_MODES",
    "Conversion",
    "ConversionError",
    "find_class_list",
    "read_class_names",
    "voc_to_coco",
    "write_coco",
    "yolo_to_coco",
]
