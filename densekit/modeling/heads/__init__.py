"""Task heads: EfficientDet class/box nets, the ESeg head and LR-ASPP (segmentation heads register in SEG_HEADS)."""
import importlib
import pkgutil

# Every module here registers its builders on import; importing them all means a new head is one new file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
