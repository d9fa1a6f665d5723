"""Necks that fuse backbone features (registered in NECKS): the BiFPN for every level range."""
import importlib
import pkgutil

# Every module here registers its builders on import; importing them all means a new neck is one new file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
