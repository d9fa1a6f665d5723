"""Data: COCO-format detection and Cityscapes segmentation datasets, their augmentations, loaders, and the embedded
synthetic datasets (shapes in COCO format, scenes in the Cityscapes layout) that need no download."""
from .coco import CocoDetection, coco_paths, datasets_root
from .decode import read_image
from .loader import build_loader, collate_batch, seed_transforms
from .synthetic import ensure_synthetic_coco, synthetic_coco_paths
from .transforms import DetectionTransform, build_eval_transform, build_train_transform, image_to_tensor

__all__ = [
    "CocoDetection",
    "DetectionTransform",
    "build_loader",
    "build_eval_transform",
    "build_train_transform",
    "coco_paths",
    "collate_batch",
    "datasets_root",
    "ensure_synthetic_coco",
    "image_to_tensor",
    "read_image",
    "seed_transforms",
    "synthetic_coco_paths",
]
