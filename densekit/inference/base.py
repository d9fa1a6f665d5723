"""What the inference wrappers share: one image's detections as the models return them, and the wrapper base."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: One image's detections as a detector returns them: ``boxes [N, 4]`` xyxy, ``scores [N]``, ``labels [N]``.
Detections = dict[str, torch.Tensor]


class DetectorWrapper(nn.Module):
    """A module around a detector that keeps its calling convention and answers for it what the evaluation and the
    :class:`densekit.Predictor` ask a detector (its config, class count, post-processor)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def postprocessor(self) -> Any:
        """The wrapped model's, so that evaluation's label restriction reaches every pass."""
        return getattr(self.model, "postprocessor", None)

    @property
    def max_detections(self) -> int:
        """Detections the wrapped model keeps per image (its post-processor's; 100 as in COCO otherwise)."""
        return int(getattr(self.postprocessor, "max_detections", 100))
