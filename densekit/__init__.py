"""densekit: EfficientDet, ESeg and LR-ASPP dense prediction on EfficientNet / MobileNetV3 backbones."""
from .checkpoint.io import CheckpointError
from .config import register_configs
from .deploy.optimize import optimize_for_inference
from .modeling.backbones import create_backbone, list_backbones
from .modeling.build import build_model, create_model, list_models, load_model_config

# Hydra tools compose conf/ against these schemas; registering on import keeps every entry point consistent.
register_configs()

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "build_model",
    "create_backbone",
    "create_model",
    "list_backbones",
    "list_models",
    "load_model_config",
    "optimize_for_inference",
]
