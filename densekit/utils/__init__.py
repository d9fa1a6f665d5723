"""Utilities that sit beside the models: complexity counting and published reference numbers."""
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
