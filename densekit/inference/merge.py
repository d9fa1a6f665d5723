"""Merging the detections of several passes over one image (test-time augmentation, tiles of a large image) into one
set: class-wise NMS over the union, weighted box fusion, and the greedy merge sliced inference uses at tile seams.

Every merge takes and returns one image's detections as the models give them (``{"boxes" [N, 4] xyxy, "scores"
[N], "labels" [N]}``, any device), sorted by decreasing score and cut to ``max_detections``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms

from .base import Detections


def concat_detections(parts: Sequence[Detections]) -> Detections:
    """One image's detections from several passes, concatenated (boxes float32, labels int64), with ``source``:
    the index of the pass each came from, and ``cut`` (boxes a tile border cut) when every part has it."""
    return {
        "boxes": torch.cat([p["boxes"].float().reshape(-1, 4) for p in parts]),
        "scores": torch.cat([p["scores"].float().reshape(-1) for p in parts]),
        "labels": torch.cat([p["labels"].long().reshape(-1) for p in parts]),
        "source": torch.cat([torch.full((len(p["scores"]),), i, dtype=torch.long, device=p["scores"].device)
                             for i, p in enumerate(parts)]),
        **({"cut": torch.cat([p["cut"] for p in parts])} if all("cut" in p for p in parts) else {}),
    }


def scoring_at_least(det: Detections, threshold: float) -> Detections:
    """``det`` (every per-box key) without the boxes scoring below ``threshold``."""
    keep = det["scores"] >= threshold
    return {key: value[keep] for key, value in det.items()}


def _top(det: Detections, order: torch.Tensor, max_detections: int) -> Detections:
    order = order[:max_detections]
    return {key: det[key][order] for key in ("boxes", "scores", "labels")}


def keep_best(det: Detections, max_detections: int) -> Detections:
    """``det``'s ``max_detections`` best boxes, by decreasing score."""
    return _top(det, torch.argsort(det["scores"], descending=True, stable=True), max_detections)


def nms_merge(det: Detections, iou_threshold: float, max_detections: int) -> Detections:
    """Class-wise NMS over the union of the passes' boxes (torchvision's batched_nms): the best-scoring of each
    group of overlapping same-class boxes is kept as it is."""
    keep = batched_nms(det["boxes"], det["scores"], det["labels"], iou_threshold)
    return _top(det, keep, max_detections)  # batched_nms returns indices by decreasing score


def weighted_box_fusion(det: Detections, iou_threshold: float, num_passes: int, max_detections: int) -> Detections:
    """Weighted box fusion (Solovyev et al., 2019, "Weighted boxes fusion: ensembling boxes from different object
    detection models"): same-class boxes overlapping a cluster's fused box by more than ``iou_threshold`` join it,
    in decreasing score order; a cluster's box is the score-weighted mean of its members', its score their mean score
    times ``min(members, num_passes) / num_passes``, so a box that only some passes found is down-weighted.

    Unlike NMS every pass moves the box, which is why it helps TTA's localisation (AP75) more than NMS does.
    """
    boxes = det["boxes"].detach().cpu().double().numpy()
    scores = det["scores"].detach().cpu().double().numpy()
    labels = det["labels"].detach().cpu().numpy()
    n = len(scores)
    weighted = np.zeros((n, 4))  # per cluster: sum of score * box
    score_sum = np.zeros(n)
    members = np.zeros(n, dtype=np.int64)
    fused = np.zeros((n, 4))
    cluster_label = np.zeros(n, dtype=labels.dtype)
    clusters = 0
    for i in np.argsort(-scores, kind="stable"):
        j = _best_cluster(boxes[i], labels[i], fused[:clusters], cluster_label[:clusters], iou_threshold)
        if j < 0:
            j, clusters = clusters, clusters + 1
            cluster_label[j] = labels[i]
        weighted[j] += scores[i] * boxes[i]
        score_sum[j] += scores[i]
        members[j] += 1
        fused[j] = weighted[j] / max(score_sum[j], 1e-12)
    fused_scores = score_sum[:clusters] / members[:clusters] * np.minimum(members[:clusters], num_passes) / num_passes
    device = det["boxes"].device
    out = {
        "boxes": torch.as_tensor(fused[:clusters], dtype=torch.float32, device=device),
        "scores": torch.as_tensor(fused_scores, dtype=torch.float32, device=device),
        "labels": torch.as_tensor(cluster_label[:clusters], dtype=torch.long, device=device),
    }
    return keep_best(out, max_detections)


def _best_cluster(box: np.ndarray, label: int, fused: np.ndarray, labels: np.ndarray, threshold: float) -> int:
    """Index of the same-class cluster whose fused box overlaps ``box`` most, above ``threshold``; -1 for none."""
    if len(fused) == 0:
        return -1
    lt = np.maximum(fused[:, :2], box[:2])
    rb = np.minimum(fused[:, 2:], box[2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(fused[:, 2:] - fused[:, :2], axis=1)
    iou = np.where(labels == label, inter / np.maximum(area + areas - inter, 1e-12), -1.0)
    j = int(np.argmax(iou))
    return j if iou[j] > threshold else -1


def intersection_over_smaller(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[M, N]`` intersection area over the smaller box's area: 1 for a box wholly inside another, whatever their
    sizes (the part of an object a tile cut off lies inside the whole object's box)."""
    inter = _intersection(a, b)
    return inter / np.maximum(np.minimum(_area(a)[:, None], _area(b)[None, :]), 1e-12)


def intersection_over_union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[M, N]`` IoU."""
    inter = _intersection(a, b)
    return inter / np.maximum(_area(a)[:, None] + _area(b)[None, :] - inter, 1e-12)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    return np.clip(rb - lt, 0, None).prod(axis=2)


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2:] - boxes[:, :2]).clip(min=0).prod(axis=1)


#: ``greedy_merge``'s overlap measures.
MATCH_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "ios": intersection_over_smaller,
    "iou": intersection_over_union,
}


def greedy_merge(det: Detections, threshold: float, max_detections: int, metric: str = "ios",
                 nms_iou: float = 0.5) -> Detections:
    """Greedy merging of the boxes of several passes (tiles), in decreasing score order: each box not yet taken
    takes the lower-scoring same-class boxes of *other* passes that belong to the same object.

    Two boxes are the same object when one of them was cut by its tile's border (``det["cut"]``; every box when
    the key is absent) and they overlap by more than ``threshold`` (intersection over the smaller box, ``"ios"``,
    or ``"iou"``): the merged box grows into their union, so the part of an object a seam cut joins the box of the
    tile that saw it whole, or the other part. Two uncut boxes are the same object when their IoU exceeds ``nms_iou``
    (NMS: the better one stays as it is). A box scoring under half the merged box's score is taken without growing
    it, and the merged box keeps its best member's score.

    The cut rule is what keeps a coarse full-image box, or a low-scoring large box, from swallowing the accurate
    tile boxes inside it (a box inside another always overlaps it by 1 of the smaller).
    """
    if metric not in MATCH_METRICS:
        raise ValueError(f"unknown match metric {metric!r}; choose one of {sorted(MATCH_METRICS)}")
    order = torch.argsort(det["scores"], descending=True, stable=True)
    boxes = det["boxes"][order].detach().cpu().double().numpy()
    scores = det["scores"][order].detach().cpu().numpy()
    labels = det["labels"][order].detach().cpu().numpy()
    source = det["source"][order].cpu().numpy() if "source" in det else np.arange(len(labels))
    cut = det["cut"][order].cpu().numpy() if "cut" in det else np.ones(len(labels), dtype=bool)
    taken = np.zeros(len(labels), dtype=bool)
    kept, merged = [], []
    for i in range(len(labels)):
        if taken[i]:
            continue
        taken[i] = True
        box, sources, any_cut = boxes[i].copy(), {source[i]}, bool(cut[i])
        grew = True
        while grew:  # the union may now reach boxes it did not overlap before
            grew = False
            for j in _same_object(box, any_cut, boxes, cut, labels == labels[i], taken, threshold, metric, nms_iou):
                if source[j] in sources:  # one box per pass: the model's NMS already chose among them
                    continue
                taken[j] = True
                sources.add(source[j])
                if scores[j] >= 0.5 * scores[i]:
                    box = np.concatenate([np.minimum(box[:2], boxes[j, :2]), np.maximum(box[2:], boxes[j, 2:])])
                    any_cut, grew = any_cut or bool(cut[j]), True
        kept.append(i)
        merged.append(box)
    keep = order.new_tensor(kept[:max_detections])
    device = det["boxes"].device
    out_boxes = torch.as_tensor(np.asarray(merged, dtype=np.float32).reshape(-1, 4)[:max_detections], device=device)
    return {"boxes": out_boxes, "scores": det["scores"][order][keep], "labels": det["labels"][order][keep]}


def _same_object(box: np.ndarray, box_cut: bool, boxes: np.ndarray, cut: np.ndarray, same_class: np.ndarray,
                 taken: np.ndarray, threshold: float, metric: str, nms_iou: float) -> np.ndarray:
    """Indices (best score first) of the untaken ``same_class`` boxes that :func:`greedy_merge` joins to ``box``: by
    ``metric`` above ``threshold`` where ``box`` or the other was cut by a tile border, by IoU above ``nms_iou``
    otherwise."""
    candidates = np.flatnonzero(~taken & same_class)
    if len(candidates) == 0:
        return candidates
    with_cut = cut[candidates] | box_cut
    overlap = MATCH_METRICS[metric](box[None], boxes[candidates])[0]
    iou = intersection_over_union(box[None], boxes[candidates])[0]
    return candidates[np.where(with_cut, overlap > threshold, iou > nms_iou)]


#: Merge names as configs spell them (``eval.tta_merge``, ``predict.slice_merge``...).
MERGES = ("wbf", "nms", "greedy")


def merge_detections(det: Detections, method: str, threshold: float, num_passes: int, max_detections: int) -> Detections:
    """``det`` (several passes' detections of one image, concatenated) merged by ``method`` (one of :data:`MERGES`)
    at ``threshold`` (IoU for ``wbf`` / ``nms``, intersection over the smaller box for ``greedy``)."""
    if method == "wbf":
        return weighted_box_fusion(det, threshold, num_passes, max_detections)
    if method == "nms":
        return nms_merge(det, threshold, max_detections)
    if method == "greedy":
        return greedy_merge(det, threshold, max_detections)
    raise ValueError(f"unknown merge {method!r}; choose one of {', '.join(MERGES)}")
