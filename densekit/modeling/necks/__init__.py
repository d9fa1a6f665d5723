"""Necks that turn backbone features into a feature pyramid: the BiFPN (P3-P7, extended to P3-P9).

Every module here registers its builder in NECKS; the package imports them all.
"""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
