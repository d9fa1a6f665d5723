"""Label values with a meaning of their own in detection targets.

Datasets write them and models read them; they live here, in neither package, so that a dataset never imports
from :mod:`densekit.modeling` and a model never imports from :mod:`densekit.data`.
"""
from __future__ import annotations

from typing import Any

#: Label of a crowd region (COCO ``iscrowd=1``) in a training target, and of the anchors the matcher leaves
#: unlabelled because they lie on one: those anchors count neither as positives nor as background in the loss.
CROWD_LABEL = -2


def coco_category_names() -> dict[int, str]:
    """COCO 2017 category id (1-90, 80 used) -> name, from torchvision's weight metadata (no download)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # index = category id; gaps are "N/A"
    return {i: name for i, name in enumerate(names) if i > 0 and name != "N/A"}


#: A head with this many outputs predicts COCO category ``id`` as label ``id - 1`` (the public EfficientDet layout).
COCO_ID_HEAD = 90


def class_names_of(model_cfg: Any) -> list[str]:
    """The name of each label a model predicts: ``model.class_names`` when recorded, COCO's names for a 90-class
    head (unused ids named ``"class <i>"``), else ``"class <i>"``."""
    num = int(model_cfg.num_classes)
    recorded = model_cfg.get("class_names") if hasattr(model_cfg, "get") else getattr(model_cfg, "class_names", None)
    if recorded:
        if len(recorded) != num:
            raise ValueError(f"model {model_cfg.name}: {len(recorded)} class_names for {num} classes")
        return [str(n) for n in recorded]
    return default_class_names(num)


def default_class_names(num_classes: int) -> list[str]:
    """Label names of a head nothing else is known about: COCO's for 90 classes, else ``"class <i>"``."""
    if num_classes == COCO_ID_HEAD:
        coco = coco_category_names()
        return [coco.get(label + 1, f"class {label}") for label in range(num_classes)]
    return [f"class {label}" for label in range(num_classes)]
