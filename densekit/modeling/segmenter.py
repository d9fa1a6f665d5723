"""Semantic segmentation meta-architecture: backbone -> optional neck -> head -> bilinear upsampling to the input."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SegmenterConfig
from .backbones import Backbone, build_backbone
from .base import DenseModel, Images, compile_target
from . import heads, necks  # noqa: F401  (register the segmentation heads and necks)
from .registry import META_ARCHS, NECKS, SEG_HEADS, MetaArch


class SegmentationLoss(nn.Module):
    """Per-pixel cross-entropy that skips ``ignore_index`` pixels, with optional online hard example mining.

    The loss is the mean over the pixels that count, so an image whose pixels are all ignored contributes zero
    (not NaN) and logits at ignored pixels get no gradient.

    Args:
        ignore_index: Label of pixels that take no part in the loss (255 in Cityscapes trainIds).
        ohem: Average over the hardest pixels only.
        ohem_thresh: With ``ohem``, keep the pixels whose true-class probability is below this; ``None`` keeps
            exactly the ``ohem_min_kept`` hardest.
        ohem_min_kept: With ``ohem``, keep at least this many of the hardest pixels (per batch).
    """

    def __init__(
        self, ignore_index: int = 255, ohem: bool = False, ohem_thresh: float | None = 0.7, ohem_min_kept: int = 100_000
    ) -> None:
        super().__init__()
        if ohem and ohem_thresh is not None and not 0.0 < ohem_thresh <= 1.0:
            raise ValueError(f"ohem_thresh is a probability in (0, 1], got {ohem_thresh}")
        self.ignore_index = ignore_index
        self.ohem = ohem
        self.ohem_thresh = ohem_thresh
        self.ohem_min_kept = ohem_min_kept

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` ``[B, C, H, W]`` against ``target`` ``[B, H, W]`` (class indices or ``ignore_index``)."""
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= logits.shape[1]))
        if bad.any():
            raise ValueError(
                f"label {int(target[bad][0])} out of range for a {logits.shape[1]}-class model "
                f"(labels are trainIds 0..{logits.shape[1] - 1}, {self.ignore_index} = ignore)"
            )
        # float32 even under autocast: a half-precision log-softmax over 2M pixels loses the small losses.
        losses = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="none")
        keep = self._hardest(losses.detach(), valid) if self.ohem else valid
        return torch.where(keep, losses, 0.0).sum() / keep.sum().clamp(min=1)

    def _hardest(self, losses: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The pixels OHEM keeps: loss above -log(thresh), or the ``ohem_min_kept`` largest if fewer are."""
        values = losses[valid]
        k = min(self.ohem_min_kept, values.numel())
        cuts = [] if self.ohem_thresh is None else [-math.log(self.ohem_thresh)]
        if k > 0:
            cuts.append(float(values.kthvalue(values.numel() - k + 1).values))  # the k-th largest loss
        if not cuts:  # nothing valid, or thresh None with min_kept 0: nothing to mine
            return valid
        return valid & (losses >= min(cuts))


class Segmenter(DenseModel):
    """A semantic segmentation model with detectron2's / torchvision's calling convention.

    * ``model.train(); model(images, targets)`` -> ``{"loss_seg": loss}``; ``targets`` holds one
      ``{"sem_seg": LongTensor [H, W]}`` per image, with trainIds and ``ignore_index`` (255) for unlabelled pixels.
    * ``model.eval(); model(images)`` -> one ``{"sem_seg": LongTensor [H, W]}`` (argmax class) per image, at that
      image's own size.
    * ``model.forward_raw(images)`` -> class logits ``[B, C, H, W]`` at the input resolution (the largest image's,
      for a list of different sizes).

    ``images`` is a float tensor ``[B, 3, H, W]`` with values in [0, 1] (uint8 0-255 is accepted too) or a list of
    ``[3, H, W]`` tensors. As in :class:`~densekit.modeling.detector.EfficientDet`, the model normalises them with
    ``pixel_mean`` / ``pixel_std`` and pads bottom/right to a multiple of the backbone's largest stride (logged
    once per size); logits are upsampled bilinearly (``align_corners=False``) to the padded size, so every pixel
    keeps its place, and then cropped.

    Args:
        backbone: Multi-scale feature extractor.
        neck: Maps the backbone features (finest first) to the head's (e.g. a :class:`BiFPN`), or ``None``.
        head: Maps the features (finest first) to class logits at the finest feature's stride; has ``num_classes``.
        loss: The training loss; its ``ignore_index`` is the model's.
        pixel_mean: Per-channel mean of inputs in [0, 1].
        pixel_std: Per-channel standard deviation of inputs in [0, 1].
    """

    def __init__(
        self,
        backbone: Backbone,
        neck: nn.Module | None,
        head: nn.Module,
        loss: SegmentationLoss,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        config: Any = None,
    ) -> None:
        super().__init__(backbone, neck, head, pixel_mean, pixel_std, config)
        self.loss = loss
        if neck is None:
            # Only a BiFPN adds features of neighbouring strides at exact 2x ratios; a head on the backbone (LR-ASPP,
            # ESeg without neck) resizes its inputs itself, so any size runs unpadded, as in torchvision. Padding
            # would change the result: LR-ASPP's global pooling would average the padded border too.
            self.size_divisor = 1

    @property
    def ignore_index(self) -> int:
        return self.loss.ignore_index

    def _upsampled_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """A stacked, unnormalised batch -> class logits at its padded size."""
        batch = self.normalize_and_pad(batch)
        features = list(self.backbone(batch).values())
        if self.neck is not None:
            features = self.neck(features)
        logits = self.head(features)
        return F.interpolate(logits, size=batch.shape[-2:], mode="bilinear", align_corners=False)

    # The two compile targets (see densekit.modeling.base.compile_target): logits, and label maps, so that a
    # compiled model fuses the full-resolution upsampling with the argmax instead of writing the [B, C, H, W] logits out.
    @compile_target
    def network(self, batch: torch.Tensor) -> torch.Tensor:
        return self._upsampled_logits(batch)

    @compile_target
    def predict_labels(self, batch: torch.Tensor) -> torch.Tensor:
        return self._upsampled_logits(batch).argmax(1)

    def forward_raw(self, images: Images) -> torch.Tensor:
        """Class logits ``[B, C, H, W]`` at the input resolution (see the class docstring)."""
        batch, sizes = self.stack_images(images)
        h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
        return self.network(batch)[..., :h, :w]

    def forward(
        self, images: Images, targets: list[dict[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Losses in training mode, per-image label maps in eval mode (see the class docstring)."""
        batch, sizes = self.stack_images(images)
        if self.training:  # check targets before spending a forward pass on them
            if targets is None:
                raise ValueError("in training mode the model needs targets: a list of {'sem_seg': LongTensor [H, W]}")
            target = self._stack_targets(targets, sizes, self.padded_size(batch.shape[-2:]), batch.device)
            return {"loss_seg": self.loss(self.training_fn("network")(batch), target)}
        # argmax is per pixel: one label map for the padded batch, then a view of each image's own region.
        labels = self.predict_labels(batch)
        return [{"sem_seg": labels[i, :h, :w]} for i, (h, w) in enumerate(sizes)]

    def _stack_targets(
        self, targets: list[dict[str, torch.Tensor]], sizes: list[tuple[int, int]], padded: tuple[int, int],
        device: torch.device,
    ) -> torch.Tensor:
        """One ``[B, H, W]`` label tensor for the padded batch; padding is ``ignore_index``."""
        if len(targets) != len(sizes):
            raise ValueError(f"got {len(targets)} targets for {len(sizes)} images")
        out = torch.full((len(sizes), *padded), self.ignore_index, dtype=torch.long, device=device)
        for i, (t, (h, w)) in enumerate(zip(targets, sizes)):
            sem = t["sem_seg"]
            if tuple(sem.shape) != (h, w):
                raise ValueError(f"target {i}: sem_seg must be [{h}, {w}] like its image, got {list(sem.shape)}")
            out[i, :h, :w] = sem
        return out


def build_segmenter(cfg: Any) -> Segmenter:
    """Assemble a :class:`Segmenter` from a resolved config (see :class:`densekit.config.SegmenterConfig`)."""
    build_head = SEG_HEADS.get(cfg.head.type)  # before building anything: an unknown head fails fast
    backbone = build_backbone(cfg.backbone, image_size=cfg.image_size)
    neck = NECKS.get(cfg.neck.type)(cfg, backbone) if cfg.neck is not None else None
    head = build_head(cfg, neck.out_channels if neck is not None else backbone.out_channels)
    loss = SegmentationLoss(cfg.ignore_index, cfg.loss.ohem, cfg.loss.ohem_thresh, cfg.loss.ohem_min_kept)
    return Segmenter(backbone, neck, head, loss, cfg.pixel_mean, cfg.pixel_std, config=cfg)


META_ARCHS.register("segmenter")(MetaArch(SegmenterConfig, build_segmenter))
