"""From raw head outputs to detections: top-k on the device, decode, clip, class-wise (soft-)NMS."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torchvision.ops import batched_nms

from .box_coder import BoxCoder


def level_views(outputs: list[torch.Tensor], last_dim: int) -> list[torch.Tensor]:
    """``[B, A*K, H, W]`` per level -> ``[B, H*W*A, K]`` per level, in anchor order (y, x, anchor).

    Views, not copies, when the outputs are channels_last (as from an ``optimize_for_inference`` model).
    """
    return [o.permute(0, 2, 3, 1).reshape(o.shape[0], -1, last_dim) for o in outputs]


def flatten_levels(outputs: list[torch.Tensor], last_dim: int) -> torch.Tensor:
    """``[B, A*K, H, W]`` per level -> ``[B, sum(H*W*A), K]`` in anchor order (level, y, x, anchor)."""
    return torch.cat(level_views(outputs, last_dim), 1)


def split_on_host(device: torch.device) -> bool:
    """Whether :func:`anchor_rows` splits the chosen anchors by level with the split points read on the host.

    On the CPU that read is free and saves concatenating every level's logits (a 17 MB copy for D0). On a GPU the
    read would stall the queue while the copy costs microseconds, so there the levels are concatenated instead and
    post-processing never copies data to the host (only the sizes of data-dependent results reach it).
    """
    return device.type == "cpu"


def anchor_rows(levels: Sequence[torch.Tensor], level_starts: Sequence[int], anchors: torch.Tensor) -> torch.Tensor:
    """The rows ``anchors`` (ascending global indices) of the concatenation of ``levels`` (``[N_l, C]`` each, the
    l-th starting at global row ``level_starts[l]``), as ``[n, C]``; see :func:`split_on_host` for how."""
    if len(levels) == 1:
        return levels[0][anchors]
    if not split_on_host(anchors.device):
        return torch.cat(list(levels))[anchors]
    starts = torch.tensor(level_starts, device=anchors.device)
    cuts = torch.searchsorted(anchors, starts).tolist()  # where each level's anchors begin in `anchors`
    return torch.cat([
        lvl[anchors[lo:hi] - start] for lvl, start, lo, hi in zip(levels, level_starts, cuts[:-1], cuts[1:])
    ])


def topk_pairs(
    cls_logits: torch.Tensor | Sequence[torch.Tensor], k: int, traceable: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest (anchor, class) logits per image, as ``cls_logits.reshape(B, -1).topk(k)`` returns them.

    ``cls_logits`` is ``[B, N, C]``, or a list of per-level ``[B, N_l, C]`` (:func:`level_views`) standing for their
    concatenation, which is then never built (a 17 MB copy for D0). A partial sort of all N x C values (4.4M for D0)
    dominates CPU post-processing. The k-th largest anchor maximum is a lower bound of the k-th largest pair (those
    k anchors' maxima are k pairs at least that large), so only pairs reaching it can be in the result, and they all
    lie in the anchors whose maximum reaches it (about k of them): gather those anchors' rows, keep the pairs
    reaching the bound, and sort the few survivors. Values come out in decreasing order; which of several logits
    tied at the cut-off are kept (and their order) can differ from a full sort, as between any two top-k kernels.

    ``traceable=True`` always takes the full sort: the shortcut's shapes depend on the data, which a traced (ONNX)
    graph cannot hold.
    """
    levels = [cls_logits] if isinstance(cls_logits, torch.Tensor) else list(cls_logits)
    batch, _, num_classes = levels[0].shape
    counts = [lvl.shape[1] for lvl in levels]
    if traceable or k >= sum(counts):  # the bound needs k anchors; fall back to the plain sort
        flat = levels[0] if len(levels) == 1 else torch.cat(levels, 1)  # (a cat of one tensor would copy it)
        return flat.reshape(batch, -1).topk(k, dim=1)
    anchor_max = torch.cat([lvl.amax(-1) for lvl in levels], 1)  # [B, N]
    bound = anchor_max.topk(k, dim=1).values[:, -1]  # [B]
    level_starts = list(itertools.accumulate(counts, initial=0))  # from the shapes: no read of the device
    values, indices = [], []
    for b in range(batch):  # a loop over images; candidate counts differ per image
        # Anchors above the bound (fewer than k), then those at it: each of these holds a pair equal to the bound,
        # so the first k of them are enough. Without this cap, logits that tie en masse (bf16, an untrained head's
        # constant prior) would send every anchor through.
        above = torch.nonzero(anchor_max[b] > bound[b]).squeeze(1)
        at = torch.nonzero(anchor_max[b] == bound[b]).squeeze(1)[:k]
        anchors = torch.cat([above, at]).sort().values  # ascending, as the level split needs
        rows = anchor_rows([lvl[b] for lvl in levels], level_starts, anchors).reshape(-1)  # [n * C]
        candidates = torch.nonzero(rows >= bound[b]).squeeze(1)
        top = rows[candidates].topk(k)
        pair = candidates[top.indices]
        values.append(top.values)
        indices.append(anchors[pair // num_classes] * num_classes + pair % num_classes)
    return torch.stack(values), torch.stack(indices)


class DetectionPostprocessor:
    """Turns flattened logits / regressions into at most ``max_detections`` boxes per image.

    Args:
        box_coder: Decodes regressions against anchors.
        pre_nms_top_k: Candidates kept per image before NMS, over all anchors x classes (5000 in EfficientDet).
        nms_iou: Class-wise NMS IoU threshold.
        max_detections: Detections kept per image.
        score_threshold: Drop candidates scoring below this (0 keeps everything, like the reference).
        soft_nms: Gaussian soft-NMS instead of hard NMS (the official COCO numbers used it).
        soft_nms_sigma: Gaussian sigma of soft-NMS, in TF's convention: scores decay by ``exp(-iou^2 / (2 sigma))``.
    """

    def __init__(
        self,
        box_coder: BoxCoder,
        pre_nms_top_k: int = 5000,
        nms_iou: float = 0.5,
        max_detections: int = 100,
        score_threshold: float = 0.0,
        soft_nms: bool = False,
        soft_nms_sigma: float = 0.5,
    ) -> None:
        self.box_coder = box_coder
        self.pre_nms_top_k = pre_nms_top_k
        self.nms_iou = nms_iou
        self.max_detections = max_detections
        self.score_threshold = score_threshold
        self.soft_nms = soft_nms
        self.soft_nms_sigma = soft_nms_sigma
        #: Optional bool ``[C]``: classes allowed to be detected (``None``: all). Evaluation sets it when the head
        #: predicts classes the dataset does not have (a 90-class COCO head on COCO's 80), so that those never take
        #: a place among the ``max_detections`` kept; see :func:`densekit.evaluation.loop.restrict_labels`.
        self.label_mask: torch.Tensor | None = None

    def __call__(
        self,
        cls_logits: torch.Tensor | Sequence[torch.Tensor],
        box_deltas: torch.Tensor,
        anchors: torch.Tensor,
        image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image.

        Args:
            cls_logits: ``[B, N, C]``, or per level ``[B, N_l, C]`` (see :func:`topk_pairs`).
            box_deltas: ``[B, N, 4]``.
            anchors: ``[N, 4]`` xyxy.
            image_sizes: ``(H, W)`` of each image before padding; boxes are clipped to it.

        Returns:
            One dict per image: ``boxes`` ``[K, 4]`` xyxy in input pixels, ``scores`` ``[K]``, ``labels`` ``[K]``
            (class index, 0-based), sorted by decreasing score.
        """
        batch = box_deltas.shape[0]
        num_classes = _num_classes(cls_logits)
        limits = torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=torch.float32, device=box_deltas.device)
        boxes, scores, classes = self.candidates(cls_logits, box_deltas, anchors, limits[:, None])

        if self.soft_nms:
            keep_idx, keep_scores = self._soft_nms(boxes, scores, classes)
        else:
            keep_idx, keep_scores = self._hard_nms(boxes, scores, classes, num_classes)

        results = []
        for b in range(batch):
            idx, sc = keep_idx[b], keep_scores[b]
            results.append({"boxes": boxes[b, idx], "scores": sc, "labels": classes[b, idx]})
        return results

    def candidates(
        self,
        cls_logits: torch.Tensor | Sequence[torch.Tensor],
        box_deltas: torch.Tensor,
        anchors: torch.Tensor,
        limits: torch.Tensor,
        traceable: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The NMS candidates: every image's ``pre_nms_top_k`` best (anchor, class) pairs, decoded and clipped.

        Shared by :meth:`__call__` and the ONNX export's in-graph post-processing
        (:mod:`densekit.deploy.onnx`), which differ only in the NMS that follows.

        Args:
            cls_logits: ``[B, N, C]``, or per level ``[B, N_l, C]`` (see :func:`topk_pairs`).
            box_deltas: ``[B, N, 4]``.
            anchors: ``[N, 4]`` xyxy.
            limits: ``(W, H, W, H)`` to clip boxes to, broadcastable to ``[B, k, 4]``: ``[B, 1, 4]`` per image or
                one ``[4]``.
            traceable: Select with one full sort, whose shapes do not depend on the data (for export).

        Returns:
            ``boxes [B, k, 4]`` (float32, xyxy), ``scores [B, k]`` (sigmoid, decreasing) and ``classes [B, k]``.
        """
        num_classes = _num_classes(cls_logits)
        if self.label_mask is not None:
            cls_logits = self._mask_labels(cls_logits, num_classes)
        k = min(self.pre_nms_top_k, box_deltas.shape[1] * num_classes)
        top_logits, top_idx = topk_pairs(cls_logits, k, traceable=traceable)
        anchor_idx = top_idx // num_classes
        classes = top_idx % num_classes
        deltas = box_deltas.gather(1, anchor_idx[..., None].expand(-1, -1, 4)).float()
        boxes = self.box_coder.decode(deltas, anchors[anchor_idx])
        boxes = torch.minimum(boxes.clamp(min=0), limits.to(boxes.dtype))
        return boxes, top_logits.float().sigmoid(), classes

    def _mask_labels(self, cls_logits: torch.Tensor | Sequence[torch.Tensor], num_classes: int) -> list[torch.Tensor]:
        if self.label_mask.numel() != num_classes:
            raise ValueError(f"label_mask has {self.label_mask.numel()} entries for {num_classes} classes")
        levels = [cls_logits] if isinstance(cls_logits, torch.Tensor) else list(cls_logits)
        blocked = ~self.label_mask.to(levels[0].device)
        return [lvl.masked_fill(blocked, float("-inf")) for lvl in levels]  # sigmoid(-inf) = 0: never selected

    def _hard_nms(self, boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, num_classes: int):
        """Class-wise NMS of every image's candidates, which come sorted by decreasing score (top-k order).

        Greedy NMS decides a box from the higher-scoring boxes alone, so the detections among the first ``m``
        candidates are the first detections of all ``k``: once every image keeps ``max_detections`` from a prefix,
        the rest cannot change the result. Start with a prefix of 4 x ``max_detections`` and widen it (x4) only for
        batches that need it; NMS over 5000 mostly-suppressed candidates is the costliest step on a CPU.
        """
        batch, k = scores.shape
        m = min(k, 4 * self.max_detections)
        while True:
            keep = self._nms_prefix(boxes[:, :m], scores[:, :m], classes[:, :m], num_classes)
            image_of = keep // m
            counts = torch.bincount(image_of, minlength=batch)
            if m == k or bool((counts >= self.max_detections).all()):
                break
            m = min(k, 4 * m)
        keep_idx, keep_scores = [], []
        for b in range(batch):  # a loop over images only; `keep` is already sorted by score
            sel = keep[image_of == b][: self.max_detections] - b * m
            keep_idx.append(sel)
            keep_scores.append(scores[b, sel])
        return keep_idx, keep_scores

    def _nms_prefix(self, boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, num_classes: int):
        """Indices into the flattened ``[B * m]`` candidates kept by one class-wise NMS call, by decreasing score."""
        batch = scores.shape[0]
        # One NMS call for the whole batch: (image, class) pairs are the groups.
        groups = classes + torch.arange(batch, device=classes.device)[:, None] * num_classes
        flat_scores = scores.reshape(-1)
        candidates = torch.nonzero(flat_scores >= self.score_threshold).squeeze(1)
        kept = batched_nms(boxes.reshape(-1, 4)[candidates], flat_scores[candidates], groups.reshape(-1)[candidates], self.nms_iou)
        return candidates[kept]

    def _soft_nms(self, boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor):
        """Gaussian soft-NMS, batched over images: ``max_detections`` rounds, each vectorised over candidates."""
        batch = scores.shape[0]
        # Shift each class to its own region of the plane so boxes of different classes never overlap.
        offset = (boxes.max() + 1) * classes[..., None].to(boxes.dtype)
        shifted = boxes + offset
        live = scores.clone()
        picks, pick_scores = [], []
        rows = torch.arange(batch, device=boxes.device)
        for _ in range(min(self.max_detections, scores.shape[1])):
            best_score, best = live.max(1)
            picks.append(best)
            pick_scores.append(best_score)
            best_box = shifted[rows, best]  # [B, 4]
            iou = box_iou_batched(best_box[:, None], shifted)[:, 0]  # [B, K]
            # TF's convention (tf.image.non_max_suppression_with_scores, used by the official EfficientDet):
            # exp(-iou^2 / (2 sigma)); Bodla et al. and effdet write exp(-iou^2 / sigma).
            live = live * torch.exp(-(iou * iou) / (2 * self.soft_nms_sigma))
            live[rows, best] = -1.0
        picks_t, scores_t = torch.stack(picks, 1), torch.stack(pick_scores, 1)
        threshold = max(self.score_threshold, 1e-3)  # soft-NMS decays scores towards 0: drop the tail
        keep = scores_t >= threshold
        return [picks_t[b][keep[b]] for b in range(batch)], [scores_t[b][keep[b]] for b in range(batch)]


def _num_classes(cls_logits: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """The class count of ``[B, N, C]`` logits or of a list of per-level ones."""
    return (cls_logits if isinstance(cls_logits, torch.Tensor) else cls_logits[0]).shape[-1]


def box_iou_batched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU ``[B, M, N]`` between ``[B, M, 4]`` and ``[B, N, 4]`` xyxy boxes (torchvision's box_iou is unbatched)."""
    lt = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    rb = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter).clamp(min=1e-9)

