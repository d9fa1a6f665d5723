"""What every meta-architecture shares: a backbone and the image batching convention (normalise, then pad)."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone

log = logging.getLogger(__name__)

Images = torch.Tensor | Sequence[torch.Tensor]


class DenseModel(nn.Module):
    """Base of :class:`~densekit.modeling.detector.EfficientDet` and :class:`~densekit.modeling.segmenter.Segmenter`.

    ``images`` are a float tensor ``[B, 3, H, W]`` with values in [0, 1] (uint8 0-255 is accepted too) or a list of
    ``[3, H, W]`` tensors. They are normalised with ``pixel_mean`` / ``pixel_std`` and padded bottom/right to a
    multiple of the backbone's largest stride: pyramid levels above the backbone are ceil-halved, so only the
    backbone's own strides need the input to divide evenly (320 px Lite0 and 1024x2048 Cityscapes run unpadded).

    Args:
        backbone: Feature extractor.
        pixel_mean: Per-channel mean of inputs in [0, 1].
        pixel_std: Per-channel standard deviation of inputs in [0, 1].
    """

    def __init__(self, backbone: Backbone, pixel_mean: Sequence[float], pixel_std: Sequence[float]) -> None:
        super().__init__()
        self.backbone = backbone
        # Not persistent: normalisation is configuration, and keeping it out of state_dict keeps checkpoints portable.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, -1, 1, 1), persistent=False)
        self.size_divisor = max(backbone.strides)
        self._warned_sizes: set[tuple[int, int]] = set()

    def preprocess(self, images: Images) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalise and pad a batch; returns it with each image's ``(H, W)`` before padding."""
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"expected images of shape [B, 3, H, W], got {list(images.shape)}")
            sizes = [tuple(images.shape[-2:])] * images.shape[0]
            batch = images
        else:
            if len(images) == 0:
                raise ValueError("expected at least one image")
            for i, img in enumerate(images):
                if img.dim() != 3 or img.shape[0] != 3:
                    raise ValueError(f"image {i}: expected shape [3, H, W], got {list(img.shape)}")
            sizes = [tuple(img.shape[-2:]) for img in images]
            h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
            batch = images[0].new_zeros((len(images), 3, h, w))
            for img, dst in zip(images, batch):
                dst[:, : img.shape[1], : img.shape[2]].copy_(img)
        if batch.dtype == torch.uint8:
            batch = batch.float() / 255.0
        batch = (batch - self.pixel_mean) / self.pixel_std
        # Padding happens after normalisation, so padded pixels are zeros of the normalised input, as in effdet.
        h, w = batch.shape[-2:]
        d = self.size_divisor
        pad_h, pad_w = -h % d, -w % d
        if pad_h or pad_w:
            if (h, w) not in self._warned_sizes:
                self._warned_sizes.add((h, w))
                log.info("input %dx%d is not a multiple of %d: padded to %dx%d", h, w, d, h + pad_h, w + pad_w)
            batch = F.pad(batch, (0, pad_w, 0, pad_h))
        return batch, [(int(a), int(b)) for a, b in sizes]
