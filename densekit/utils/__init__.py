"""Utilities that sit beside the models: complexity counting, published reference numbers and reference
implementations to compare against, benchmark timing, drawing detections, and JSON result files."""
from .complexity import count_macs, count_parameters, format_count, to_meta
from .reference import EFFDET_PARAMS, PAPER, PaperNumbers

__all__ = [
    "EFFDET_PARAMS",
    "PAPER",
    "PaperNumbers",
    "count_macs",
    "count_parameters",
    "format_count",
    "to_meta",
]
