"""What every meta-architecture shares: a backbone and the image batching convention (normalise, then pad)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone
from .grad_checkpoint import guard_batchnorm_statistics

log = logging.getLogger(__name__)

Images = torch.Tensor | Sequence[torch.Tensor]
F_ = TypeVar("F_", bound=Callable[..., Any])


def compile_target(method: F_) -> F_:
    """Mark a model method as a compile target: a pure tensor function of a stacked batch (input normalisation and
    padding included), with data-dependent work (NMS, per-image cropping) left outside, which
    :func:`densekit.optimize_for_inference` may replace with a compiled version."""
    method.is_compile_target = True  # type: ignore[attr-defined]
    return method


class DenseModel(nn.Module):
    """Base of :class:`~densekit.modeling.detector.EfficientDet` and :class:`~densekit.modeling.segmenter.Segmenter`.

    ``images`` are a float tensor ``[B, 3, H, W]`` with values in [0, 1] (uint8 0-255 is accepted too) or a list of
    ``[3, H, W]`` tensors. They are normalised with ``pixel_mean`` / ``pixel_std`` and padded bottom/right to a
    multiple of the backbone's largest stride: pyramid levels above the backbone are ceil-halved, so only the
    backbone's own strides need the input to divide evenly (320 px Lite0 and 1024x2048 Cityscapes run unpadded).

    Args:
        backbone: Feature extractor.
        neck: Feature fusion over the backbone's levels (a BiFPN), or ``None`` where the head reads the backbone.
        head: The task head; has ``num_classes``.
        pixel_mean: Per-channel mean of inputs in [0, 1].
        pixel_std: Per-channel standard deviation of inputs in [0, 1].
        config: The resolved model config the model was built from (``model.config``; None for a hand-built model).
    """

    def __init__(
        self,
        backbone: Backbone,
        neck: nn.Module | None,
        head: nn.Module,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        config: Any = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.neck = neck
        self.head = head
        # Not persistent: normalisation is configuration, and keeping it out of state_dict keeps checkpoints portable.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, -1, 1, 1), persistent=False)
        self.size_divisor = max(backbone.strides)
        self._warned_sizes: set[tuple[int, int]] = set()
        self._training_compiled: dict[str, Callable[..., Any]] = {}

    # The methods train.compile compiles (compile_for_training): the training forward's tensor work, split where the
    # shapes change for different reasons (the network with the image size, a detector's loss with the box count).
    training_compile_targets: tuple[str, ...] = ("network",)

    def compile_for_training(self, **options: Any) -> None:
        """``train.compile``: run :attr:`training_compile_targets` through ``torch.compile`` (forward and backward)
        in training mode. Target checks and padding stay eager, so they still raise on bad targets; evaluation
        (``eval()`` mode) and copies of the model (the EMA, :func:`copy.deepcopy`) run eagerly.

        The network compiles with static shapes, once per training size; the other targets (a detector's loss, whose
        inputs grow with the number of boxes in the batch) recompile once more with dynamic shapes, then no more.
        """
        self._training_compiled = {
            name: torch.compile(getattr(self, name), **{"dynamic": False if name == "network" else None, **options})
            for name in self.training_compile_targets
        }

    def training_fn(self, name: str) -> Callable[..., Any]:
        """Method ``name``, compiled when :meth:`compile_for_training` compiled it and the model is training."""
        return self._training_compiled.get(name, getattr(self, name)) if self.training else getattr(self, name)

    def __getstate__(self) -> dict[str, Any]:
        # A copy runs eagerly: compiled functions belong to (and call) the model they were made from.
        return {**self.__dict__, "_training_compiled": {}}

    @classmethod
    def compile_targets(cls) -> tuple[str, ...]:
        """Names of the methods marked with :func:`compile_target` (``network``, and for a segmenter
        ``predict_labels``): the functions :func:`densekit.optimize_for_inference` compiles."""
        return tuple(name for name in dir(cls) if getattr(getattr(cls, name, None), "is_compile_target", False))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """``model.grad_checkpoint``: recompute the backbone's stages and the neck's layers in the backward pass
        (training memory down, about one extra forward of them per step); same gradients and BN statistics.

        Raises:
            NotImplementedError: the backbone (or the neck) cannot do it; nothing is changed then.
        """
        if enable and self.neck is not None and not hasattr(self.neck, "grad_checkpointing"):
            raise NotImplementedError(f"{type(self.neck).__name__} has no gradient checkpointing; use model.grad_checkpoint=false")
        self.backbone.set_grad_checkpointing(enable)  # raises before anything changed where it cannot
        if self.neck is not None:
            self.neck.grad_checkpointing = enable
        if enable:
            guard_batchnorm_statistics(self)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def class_predictor(self) -> dict[str, int]:
        """``state_dict`` keys of the parameters whose rows are classes, each with its rows per class: the tensors
        fine-tuning to another class count re-initialises (:func:`densekit.checkpoint.finetune.load_for_finetuning`)."""
        return {f"head.{key}": rows for key, rows in self.head.class_predictor().items()}

    def output_layers(self) -> list[str]:
        """Names (as in ``named_modules()``) of the layers that write the raw outputs: class logits, and box
        regressions for detectors. What int8 keeps in float by default (:mod:`densekit.deploy.quantize`)."""
        return [f"head.{name}" for name in self.head.output_layers()]

    def stack_images(self, images: Images) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Check ``images`` and stack a list into one zero-padded batch; returns it with each image's ``(H, W)``.

        Validation and list handling stay out of :meth:`normalize_and_pad`, which is pure tensor work and so can be
        compiled into the network (:func:`densekit.optimize_for_inference`).
        """
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"expected images of shape [B, 3, H, W], got {list(images.shape)}")
            if not self.training:  # training has the NaN guard on the loss, and no host sync to spare per step
                _check_finite(images)
            return images, [(int(images.shape[-2]), int(images.shape[-1]))] * images.shape[0]
        if len(images) == 0:
            raise ValueError("expected at least one image")
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i}: expected shape [3, H, W], got {list(img.shape)}")
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        for i, img in enumerate(images if not self.training else ()):
            _check_finite(img[None], first_index=i)
        h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
        batch = images[0].new_zeros((len(images), 3, h, w))
        for img, dst in zip(images, batch):
            dst[:, : img.shape[1], : img.shape[2]].copy_(img)
        return batch, sizes

    def normalize_and_pad(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] (or uint8) -> normalised and padded to a multiple of ``size_divisor``."""
        if batch.dtype == torch.uint8:
            batch = batch.float() / 255.0
        # One fused multiply-add pass over the image instead of a subtraction and a division.
        batch = torch.addcmul(-self.pixel_mean / self.pixel_std, batch, 1.0 / self.pixel_std)
        # Padding happens after normalisation, so padded pixels are zeros of the normalised input, as in effdet.
        h, w = batch.shape[-2:]
        padded_h, padded_w = self.padded_size((h, w))
        pad_h, pad_w = padded_h - h, padded_w - w
        if pad_h or pad_w:
            if (h, w) not in self._warned_sizes and not torch.compiler.is_compiling():
                self._warned_sizes.add((h, w))
                log.info("input %dx%d is not a multiple of %d: padded to %dx%d", h, w, self.size_divisor, h + pad_h, w + pad_w)
            batch = F.pad(batch, (0, pad_w, 0, pad_h))
        return batch

    def padded_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The ``(H, W)`` a batch of size ``size`` has after :meth:`normalize_and_pad`."""
        d = self.size_divisor
        return -(-int(size[0]) // d) * d, -(-int(size[1]) // d) * d


def _check_finite(batch: torch.Tensor, first_index: int = 0) -> None:
    """Refuse NaN / inf pixels up front: they would otherwise surface deep in post-processing (top-k over NaN
    scores) with a message that names nothing. One reduction over the input, negligible beside the network."""
    if not batch.is_floating_point() or batch.is_meta or torch.compiler.is_compiling():  # meta: counting MACs
        return
    if not bool(torch.isfinite(batch).all()):
        bad = [first_index + i for i in range(batch.shape[0]) if not bool(torch.isfinite(batch[i]).all())]
        raise ValueError(
            f"image(s) {bad} of the batch contain NaN or inf pixel values; check the image files or the "
            "preprocessing that produced them (inputs are RGB in [0, 1] or uint8 0-255)"
        )
