"""Prediction heads: EfficientDet's shared class / box towers, ESeg's multi-level fusion head, and LR-ASPP.

Heads that register a builder (segmentation heads in SEG_HEADS) are found by importing every module here.
"""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
