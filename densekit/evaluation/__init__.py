"""Evaluation: COCO bbox metrics and test-dev submission files."""
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
