"""Evaluation: COCO bbox metrics (pycocotools) and test-dev submission files, Cityscapes semantic segmentation
scores (IoU, iIoU, equal to cityscapesscripts') and labelId prediction PNGs, and their printed tables."""
from .coco import (
    COCO_METRIC_NAMES,
    CocoEvaluator,
    detections_to_coco,
    format_coco_table,
    write_results_json,
    write_test_dev_submission,
)

__all__ = [
    "COCO_METRIC_NAMES",
    "CocoEvaluator",
    "detections_to_coco",
    "format_coco_table",
    "write_results_json",
    "write_test_dev_submission",
]
