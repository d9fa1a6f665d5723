"""EfficientDet meta-architecture: backbone -> BiFPN -> class/box head, with anchors, loss and post-processing."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .anchors import AnchorGenerator
from .backbones import Backbone
from .heads.efficientdet import EfficientDetHead
from .losses import DetectionLoss
from .matcher import ArgMaxMatcher
from .necks.bifpn import BiFPN
from .postprocess import DetectionPostprocessor, flatten_levels

log = logging.getLogger(__name__)

Images = torch.Tensor | Sequence[torch.Tensor]


class EfficientDet(nn.Module):
    """A one-stage detector with torchvision's calling convention.

    * ``model.train(); model(images, targets)`` -> ``{"loss_cls", "loss_box"}`` (sum them for the total).
    * ``model.eval(); model(images)`` -> one ``{"boxes", "scores", "labels"}`` dict per image, boxes ``(x1, y1, x2,
      y2)`` in input pixels, labels 0-based class indices (for a 90-class COCO head, COCO id = label + 1).
    * ``model.forward_raw(images)`` -> per-level class logits ``[B, A*C, H, W]`` and box regressions
      ``[B, A*4, H, W]``.

    ``images`` is a float tensor ``[B, 3, H, W]`` with values in [0, 1] (uint8 0-255 is accepted too) or a list of
    ``[3, H, W]`` tensors. The model normalises them with ``pixel_mean`` / ``pixel_std`` and pads bottom/right to a
    multiple of the backbone's largest stride (32), which leaves box coordinates unchanged; boxes are clipped to each
    unpadded image.
    """

    def __init__(
        self,
        backbone: Backbone,
        neck: BiFPN,
        head: EfficientDetHead,
        anchor_generator: AnchorGenerator,
        matcher: ArgMaxMatcher,
        loss: DetectionLoss,
        postprocessor: DetectionPostprocessor,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.anchor_generator = anchor_generator
        self.matcher = matcher
        self.loss = loss
        self.postprocessor = postprocessor
        # Not persistent: normalisation is configuration, and keeping it out of state_dict keeps checkpoints portable.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, -1, 1, 1), persistent=False)
        # Levels above the backbone are made by ceil-halving (TF 'SAME' pooling), exactly as the anchors assume, so
        # only the backbone's own strides need the input to divide evenly: 320 px (Lite0) runs as is, like effdet.
        self.size_divisor = max(backbone.strides)
        self._warned_sizes: set[tuple[int, int]] = set()

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

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

    def _features(self, batch: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        features = list(self.backbone(batch).values())
        return self.head(self.neck(features))

    def forward_raw(self, images: Images) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-level class logits and box regressions (see the class docstring)."""
        batch, _ = self.preprocess(images)
        return self._features(batch)

    def forward(self, images: Images, targets: list[dict[str, torch.Tensor]] | None = None):
        batch, sizes = self.preprocess(images)
        if self.training:  # check targets before spending a forward pass on them
            if targets is None:
                raise ValueError("in training mode the model needs targets: a list of {'boxes', 'labels'} per image")
            gt_boxes, gt_labels = self._pad_targets(targets, batch.shape[0], batch.device)
        cls_out, box_out = self._features(batch)
        cls_logits = flatten_levels(cls_out, self.num_classes)
        box_deltas = flatten_levels(box_out, 4)
        anchors = self.anchor_generator(batch.shape[-2:], batch.device)
        if self.training:
            return self.loss(cls_logits, box_deltas, self.matcher(anchors, gt_boxes, gt_labels))
        return self.postprocessor(cls_logits, box_deltas, anchors, sizes)

    def _pad_targets(self, targets: list[dict[str, torch.Tensor]], batch: int, device: torch.device):
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for {batch} images")
        most = max((len(t["labels"]) for t in targets), default=0)
        boxes = torch.zeros(batch, most, 4, device=device)
        labels = torch.full((batch, most), -1, dtype=torch.long, device=device)
        for i, t in enumerate(targets):
            n = len(t["labels"])
            if t["boxes"].shape != (n, 4):
                raise ValueError(f"target {i}: boxes must be [{n}, 4] xyxy, got {list(t['boxes'].shape)}")
            lab = t["labels"].to(device=device, dtype=torch.long)
            bad = (lab >= self.num_classes) | (lab < -2)
            if bad.any():
                raise ValueError(
                    f"target {i}: label {int(lab[bad][0])} out of range for a {self.num_classes}-class model "
                    "(labels are 0-based class indices; -2 marks a crowd region)"
                )
            boxes[i, :n] = t["boxes"].to(device)
            labels[i, :n] = lab
        return boxes, labels
