"""Utilities that sit beside the models: parameter / MAC counting (``complexity``), the papers' published numbers
(``reference``), drawing predictions (``visualize``), atomic JSON files (``files``) and the CPU allocator setting of
the inference path (``memory``)."""
from .complexity import count_macs, count_parameters, format_count, to_meta
from .reference import PAPER, PaperNumbers

__all__ = [
    "PAPER",
    "PaperNumbers",
    "count_macs",
    "count_parameters",
    "format_count",
    "to_meta",
]
