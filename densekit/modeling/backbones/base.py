"""The backbone interface every detector and segmenter builds on.

A backbone maps an image batch to named multi-scale features. Like detectron2's ``Backbone.output_shape()``, it
also describes those features (name, stride, channels) before any forward pass, so that necks and heads can be
built from the description alone.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FeatureSpec:
    """Describes one feature map a backbone returns.

    Attributes:
        name: Key of the feature in the backbone's output dict, ``"c{level}"`` (``"c3"`` is stride 8).
        stride: Down-sampling factor relative to the input image.
        channels: Number of channels.
    """

    name: str
    stride: int
    channels: int

    @property
    def level(self) -> int:
        """Pyramid level, log2 of the stride (stride 8 -> level 3)."""
        return self.stride.bit_length() - 1


class Backbone(nn.Module):
    """Base class: subclasses set ``self.feature_specs``, return ``{spec.name: tensor}`` in that order, and load
    weights in the layouts of the library they wrap (:meth:`load_weights`)."""

    feature_specs: list[FeatureSpec]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_weights(  # pragma: no cover - abstract
        self, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
    ) -> None:
        """Load ``state_dict`` into this backbone, all-or-nothing.

        Accepts densekit's own keys (this module's ``state_dict()``) and whatever layouts the subclass documents
        (e.g. a bare timm or torchvision classification checkpoint, whose classifier tensors are ignored). Either
        every tensor is loaded or none is: the checks run before the first tensor is copied
        (:func:`~densekit.checkpoint.io.load_state_dict_checked`). ``create_backbone(weights=...)`` and
        ``weights=`` files with no detector / segmenter keys end here.

        Args:
            state_dict: The tensors, keyed in a layout the subclass recognises.
            source: What the tensors came from (e.g. ``"weights file b0.pth"``), quoted in errors.

        Raises:
            CheckpointError: naming ``source`` and the missing, unexpected and wrongly shaped keys; the backbone
                is left unchanged.
        """
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute this backbone's stages in the backward pass instead of keeping their activations
        (``model.grad_checkpoint``, see :mod:`densekit.modeling.grad_checkpoint`); only in training with grad."""
        raise NotImplementedError(f"{type(self).__name__} has no gradient checkpointing; use model.grad_checkpoint=false")

    def layers_up_to_stride(self, stride: int) -> list[nn.Module]:
        """The stem and the stages that run at a stride of at most ``stride``, in execution order: what
        ``train.freeze_at`` freezes (weights and BatchNorm statistics), as detectron2's ``FREEZE_AT``."""
        raise NotImplementedError(f"{type(self).__name__} cannot freeze its first stages; use train.freeze_at=0")

    @property
    def out_channels(self) -> list[int]:
        return [s.channels for s in self.feature_specs]

    @property
    def strides(self) -> list[int]:
        return [s.stride for s in self.feature_specs]


def level_name(level: int) -> str:
    """Name of a backbone feature at a pyramid level (``3 -> "c3"``)."""
    return f"c{level}"
