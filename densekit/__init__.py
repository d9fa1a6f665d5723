"""densekit: EfficientDet, ESeg and LR-ASPP dense prediction on EfficientNet / MobileNetV3 backbones.

Importing densekit has no side effects: Hydra entry points call :func:`densekit.config.register_configs` themselves.
"""
from .api import evaluate, train
from .checkpoint.io import CheckpointError
from .checkpoint.zoo import list_weights
from .deploy.optimize import optimize_for_inference
from .deploy.predictor import Predictor
from .modeling.backbones import create_backbone, list_backbones
from .modeling.build import build_model, create_model, list_models, load_model_config

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "Predictor",
    "build_model",
    "create_backbone",
    "create_model",
    "evaluate",
    "list_backbones",
    "list_models",
    "list_weights",
    "load_model_config",
    "optimize_for_inference",
    "train",
]
