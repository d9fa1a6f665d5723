"""Anchors fitted to a detection dataset: the anchor recall of a model config, and anchor settings that raise it.

The **anchor recall** is the share of ground-truth boxes that some anchor overlaps with IoU >= ``model.loss.match_iou``
(the matcher's positive threshold), with the boxes at the training input size (each image's longest side scaled to
``data.image_size`` or the model's, as the train transform scales it before its jitter) and the anchors of densekit's
own :class:`~densekit.modeling.anchors.AnchorGenerator` for that input (padded as the model pads it). A box no anchor
reaches is trained through the one anchor the matcher forces onto it (``force_match``), at a low IoU: such boxes are
learned poorly, and a dataset of elongated or small objects can have many of them under the default anchors.

:func:`fit_anchors` searches ``anchors.aspect_ratios`` (k-means on the boxes' log aspect ratios), then
``anchors.anchor_scale`` and ``anchors.num_scales`` on top, and reports the recall each step reaches with the Hydra
overrides to paste (``model.anchors.aspect_ratios=[[1.0,1.0],[2.45,0.41]] ...``). ``densekit inspect`` prints it in its
"anchors" section; ``densekit train`` warns when the recall is below :data:`WARN_BELOW` (:func:`check_anchor_recall`).

The best IoU of a box over the anchors of a level is reached at the grid cell nearest to its centre (per axis: the
overlap of two intervals only shrinks as their centres move apart, and every anchor of a cell shares its centre), so
each box is compared with ``levels x anchors-per-location`` anchors of the generator, not all of them; the result is
the maximum :func:`torchvision.ops.box_iou` over every anchor (:func:`max_anchor_iou_exhaustive`, which the tests
compare it with).
"""
from __future__ import annotations

import logging
import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from ..config import as_overrides
from .anchors import AnchorGenerator, feature_sizes

__all__ = ["AnchorFit", "AnchorGeometry", "AnchorSetting", "Suggestion", "WARN_BELOW", "anchor_recall",
           "boxes_at_input_size", "check_anchor_recall", "fit_anchors", "format_anchor_fit", "inspect_command",
           "kmeans_aspect_ratios", "max_anchor_iou", "max_anchor_iou_exhaustive"]

log = logging.getLogger(__name__)

#: ``densekit train`` warns when the anchor recall of its training boxes is below this.
WARN_BELOW = 0.9
#: Boxes ``densekit train``'s check samples (a random, seeded subset of larger datasets).
TRAIN_CHECK_BOXES = 2000
#: ``anchors.anchor_scale`` values the search tries (besides the config's own).
SCALE_GRID = (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
#: ``anchors.num_scales`` values the search tries (besides the config's own).
NUM_SCALES_GRID = (2, 3, 4)
#: Aspect-ratio set sizes the k-means tries: 1 to this.
MAX_ASPECTS = 5
#: Factors the fitted aspect ratios are pulled towards square by (on their log), see :func:`kmeans_aspect_ratios`.
SHRINK = (1.0, 0.85, 0.7, 0.55)
#: Fitted aspect ratios closer than this factor are merged into one shape.
MERGE_BELOW = 1.25
#: A fitted aspect ratio (or its inverse) below this is square.
SQUARE_BELOW = 1.1
#: (aspect ratios, anchor_scale) pairs whose ``num_scales`` the search varies.
KEEP = 8
#: Recalls within this of the best count as equal: the setting with fewer anchors per location wins.
TIE = 0.005


@dataclass(frozen=True)
class AnchorSetting:
    """The ``model.anchors`` keys (:class:`densekit.config.AnchorConfig`): ``(w, h)`` multipliers, base size in
    strides, octave scales per level."""

    aspect_ratios: tuple[tuple[float, float], ...]
    anchor_scale: float
    num_scales: int

    @classmethod
    def of(cls, anchors_cfg: Any) -> AnchorSetting:
        """The setting of a model config's ``anchors`` node."""
        ratios = tuple((float(w), float(h)) for w, h in anchors_cfg.aspect_ratios)
        return cls(ratios, float(anchors_cfg.anchor_scale), int(anchors_cfg.num_scales))

    @property
    def anchors_per_location(self) -> int:
        return self.num_scales * len(self.aspect_ratios)

    def overrides(self) -> list[str]:
        """The Hydra overrides that set it: ``model.anchors.aspect_ratios=[[1.0,1.0],[2.45,0.41]]`` ..."""
        return as_overrides({"model": {"anchors": {
            "aspect_ratios": [[round(w, 2), round(h, 2)] for w, h in self.aspect_ratios],
            "anchor_scale": round(self.anchor_scale, 2),
            "num_scales": self.num_scales,
        }}})


@dataclass(frozen=True)
class AnchorGeometry:
    """What the anchors depend on besides the setting: the levels, the (padded) input and the positive IoU."""

    min_level: int
    max_level: int
    input_size: tuple[int, int]
    match_iou: float

    @classmethod
    def of(cls, model_cfg: Any, image_size: int) -> AnchorGeometry:
        """For a detector config trained at ``image_size`` (a square side), padded as the model pads its input: to a
        multiple of its backbone's largest stride."""
        divisor = 2 ** max(int(level) for level in model_cfg.backbone.out_levels)
        side = -(-int(image_size) // divisor) * divisor
        return cls(int(model_cfg.neck.min_level), int(model_cfg.neck.max_level), (side, side),
                   float(model_cfg.loss.match_iou))

    def generator(self, setting: AnchorSetting) -> AnchorGenerator:
        return AnchorGenerator(self.min_level, self.max_level, setting.num_scales, setting.aspect_ratios,
                               setting.anchor_scale)

    def smallest_anchor(self, setting: AnchorSetting) -> float:
        """Side of the smallest square anchor in input pixels: ``anchor_scale * 2 ** min_level``."""
        return setting.anchor_scale * 2.0**self.min_level


def boxes_at_input_size(coco: Mapping[str, Any], image_size: int, max_boxes: int | None = None,
                        seed: int = 0) -> np.ndarray:
    """The boxes a model trains on, ``float64 [N, 4]`` xyxy in input pixels, from a COCO dict (a json's content).

    Non-crowd annotations, clipped to their image (boxes of zero area or wholly outside dropped, as
    :class:`~densekit.data.coco.CocoDetection` does), each image scaled so that its longest side is ``image_size``
    (the train transform's resize before its scale jitter; the image sits at the top-left of the padded input).
    ``max_boxes``: a random subset (seeded) of at most that many.
    """
    sizes = {image["id"]: (float(image["height"]), float(image["width"])) for image in coco.get("images", [])}
    rows: list[list[float]] = []
    for ann in coco.get("annotations", []) or []:
        if ann.get("iscrowd", 0) or ann.get("image_id") not in sizes:
            continue
        h, w = sizes[ann["image_id"]]
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
        if bw <= 0 or bh <= 0 or x1 <= x0 or y1 <= y0:
            continue
        scale = image_size / max(h, w)
        rows.append([x0 * scale, y0 * scale, x1 * scale, y1 * scale])
    boxes = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    if max_boxes is not None and len(boxes) > max_boxes:
        keep = np.sort(np.random.default_rng(seed).choice(len(boxes), max_boxes, replace=False))
        boxes = boxes[keep]
    return boxes


def _pairwise_iou(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """IoU of ``boxes[..., 4]`` with ``anchors[..., 4]`` element by element (broadcast), xyxy."""
    low, high = torch.maximum(boxes[..., :2], anchors[..., :2]), torch.minimum(boxes[..., 2:], anchors[..., 2:])
    wh = (high - low).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_b = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    area_a = (anchors[..., 2] - anchors[..., 0]) * (anchors[..., 3] - anchors[..., 1])
    return inter / (area_b + area_a - inter)


def _nearest(centres: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the entry of the sorted ``centres`` nearest to each of ``values``."""
    right = torch.searchsorted(centres, values.contiguous()).clamp(max=len(centres) - 1)
    left = (right - 1).clamp(min=0)
    return torch.where((values - centres[left]).abs() <= (centres[right] - values).abs(), left, right)


def max_anchor_iou(boxes: np.ndarray | torch.Tensor, setting: AnchorSetting, geometry: AnchorGeometry) -> np.ndarray:
    """Each box's best IoU with the anchors of ``setting`` (see the module docstring: the anchors of the grid cell
    nearest to its centre, at every level)."""
    boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float64)).reshape(-1, 4)
    if len(boxes_t) == 0:
        return np.zeros(0)
    generator = geometry.generator(setting)
    anchors = generator(geometry.input_size).double()
    per_cell = generator.num_anchors
    centre = (boxes_t[:, :2] + boxes_t[:, 2:]) / 2
    best = torch.zeros(len(boxes_t), dtype=torch.float64)
    start = 0
    for level in range(geometry.min_level, geometry.max_level + 1):
        fh, fw = _level_size(geometry.input_size, level)
        grid = anchors[start:start + fh * fw * per_cell].reshape(fh, fw, per_cell, 4)
        start += fh * fw * per_cell
        xs = (grid[0, :, 0, 0] + grid[0, :, 0, 2]) / 2
        ys = (grid[:, 0, 0, 1] + grid[:, 0, 0, 3]) / 2
        cells = grid[_nearest(ys, centre[:, 1]), _nearest(xs, centre[:, 0])]  # [N, A, 4]
        best = torch.maximum(best, _pairwise_iou(boxes_t[:, None], cells).amax(1))
    if start != len(anchors):  # pragma: no cover - the generator's layout changed
        raise RuntimeError(f"anchor layout: {len(anchors)} anchors, expected {start}")
    return best.numpy()


def _level_size(input_size: tuple[int, int], level: int) -> tuple[int, int]:
    return feature_sizes(input_size, level)[level]


def max_anchor_iou_exhaustive(boxes: np.ndarray | torch.Tensor, setting: AnchorSetting, geometry: AnchorGeometry,
                              chunk: int = 256) -> np.ndarray:
    """:func:`max_anchor_iou` the slow way: :func:`torchvision.ops.box_iou` of every box with every anchor."""
    boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    anchors = geometry.generator(setting)(geometry.input_size)
    out = [box_iou(boxes_t[i:i + chunk], anchors).amax(1) for i in range(0, len(boxes_t), chunk)]
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def anchor_recall(boxes: np.ndarray, setting: AnchorSetting, geometry: AnchorGeometry) -> float:
    """The share of ``boxes`` some anchor of ``setting`` reaches at IoU >= ``geometry.match_iou`` (1.0 for none)."""
    if len(boxes) == 0:
        return 1.0
    return float((max_anchor_iou(boxes, setting, geometry) >= geometry.match_iou).mean())


def kmeans_aspect_ratios(boxes: np.ndarray, k: int, shrink: float = 1.0, iterations: int = 50
                         ) -> tuple[tuple[float, float], ...]:
    """``k`` anchor shapes ``(w, h)`` (``w * h = 1``) from 1-D k-means on the boxes' ``log(w / h)``, started at their
    quantiles (deterministic), sorted from tall to wide and rounded to 2 decimals; fewer when centres coincide.

    ``shrink`` < 1 pulls the shapes towards square (their log aspect times ``shrink``): an elongated anchor is thin in
    units of its level's stride, so a box centred between two cells loses much of its overlap with it; a less
    elongated anchor keeps more, which can outweigh the shape mismatch (the search tries both).
    """
    log_aspect = np.log((boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1]))
    centres = np.quantile(log_aspect, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        assign = np.abs(log_aspect[:, None] - centres[None]).argmin(1)
        updated = np.array([log_aspect[assign == j].mean() if (assign == j).any() else centres[j] for j in range(k)])
        if np.allclose(updated, centres):
            break
        centres = updated
    merged: list[list[float]] = []  # centres closer than MERGE_BELOW in aspect are one shape (their mean)
    for c in np.sort(np.where(np.abs(centres) < math.log(SQUARE_BELOW), 0.0, centres)):
        if merged and c - np.mean(merged[-1]) < math.log(MERGE_BELOW):
            merged[-1].append(float(c))
        else:
            merged.append([float(c)])
    shapes = {(round(math.exp(shrink * m / 2), 2), round(math.exp(-shrink * m / 2), 2)) for m in map(np.mean, merged)}
    return tuple(sorted(shapes, key=lambda wh: wh[0] / wh[1]))


@dataclass(frozen=True)
class Suggestion:
    """An anchor setting, what it changes against the config's, and the recall it reaches."""

    what: str
    setting: AnchorSetting
    recall: float


@dataclass(frozen=True)
class AnchorFit:
    """The config's anchors and the suggestions of :func:`fit_anchors`.

    Attributes:
        boxes: The boxes compared (after sampling).
        geometry: Levels, padded input size and IoU threshold.
        current: The config's setting and its recall.
        suggestions: Each search step that raised the recall (aspect ratios; + anchor_scale; + num_scales), in order.
    """

    boxes: int
    geometry: AnchorGeometry
    current: Suggestion
    suggestions: tuple[Suggestion, ...]

    @property
    def recommended(self) -> Suggestion | None:
        """The first suggestion within :data:`TIE` of the best recall found (the fewest changes), ``None`` when none
        beats the config's by more than :data:`TIE`."""
        if not self.suggestions:
            return None
        best = max(s.recall for s in self.suggestions)
        return next(s for s in self.suggestions if s.recall >= best - TIE)


def _pick(candidates: Iterable[Suggestion], reference: AnchorSetting) -> Suggestion:
    """The highest recall; within :data:`TIE` of it the fewest anchors per location, then the anchor_scale closest
    to the reference's."""
    ranked = list(candidates)
    best = max(s.recall for s in ranked)
    close = [s for s in ranked if s.recall >= best - TIE]
    return min(close, key=lambda s: (s.setting.anchors_per_location,
                                     abs(math.log(s.setting.anchor_scale / reference.anchor_scale)), -s.recall))


def fit_anchors(boxes: np.ndarray, model_cfg: Any, image_size: int) -> AnchorFit:
    """The recall of ``model_cfg``'s anchors on ``boxes`` (:func:`boxes_at_input_size` at ``image_size``) and
    settings that raise it, searched in three steps, each keeping the previous steps' choices open:

    1. ``aspect_ratios``: the config's set and k-means sets of 1 to :data:`MAX_ASPECTS` shapes, each also pulled
       towards square by the factors of :data:`SHRINK` (:func:`kmeans_aspect_ratios`);
    2. ``anchor_scale`` from :data:`SCALE_GRID` with each of those sets;
    3. ``num_scales`` from :data:`NUM_SCALES_GRID` with the :data:`KEEP` best (set, scale) pairs of step 2.

    A step is suggested when it beats the previous recall by more than :data:`TIE`."""
    geometry = AnchorGeometry.of(model_cfg, image_size)
    config = AnchorSetting.of(model_cfg.anchors)
    current = Suggestion("the config's anchors", config, anchor_recall(boxes, config, geometry))
    if len(boxes) == 0:
        return AnchorFit(0, geometry, current, ())
    fitted = (kmeans_aspect_ratios(boxes, k, shrink) for k in range(1, MAX_ASPECTS + 1) for shrink in SHRINK)
    aspect_sets = list(dict.fromkeys([config.aspect_ratios, *fitted]))
    scales = sorted({config.anchor_scale, *SCALE_GRID})
    cache: dict[AnchorSetting, float] = {}

    def scored(what: str, settings: Iterable[AnchorSetting]) -> list[Suggestion]:
        for setting in settings:
            if setting not in cache:
                cache[setting] = anchor_recall(boxes, setting, geometry)
        return [Suggestion(what, s, cache[s]) for s in settings]

    ratios = scored("aspect_ratios", [replace(config, aspect_ratios=a) for a in aspect_sets])
    scaled = scored("aspect_ratios + anchor_scale", [replace(config, aspect_ratios=a, anchor_scale=s)
                                                     for a in aspect_sets for s in scales])
    best_pairs = sorted(scaled, key=lambda s: -s.recall)[:KEEP]
    counts = sorted({config.num_scales, *NUM_SCALES_GRID})
    octaves = scored("aspect_ratios + anchor_scale + num_scales",
                     [replace(s.setting, num_scales=n) for s in best_pairs for n in counts])
    suggestions: list[Suggestion] = []
    last = current.recall
    for step in (ratios, scaled, octaves):
        pick = _pick(step, config)
        if pick.recall > last + TIE:
            suggestions.append(pick)
            last = pick.recall
    return AnchorFit(len(boxes), geometry, current, tuple(suggestions))


def _describe(setting: AnchorSetting) -> str:
    ratios = ", ".join(f"{w:g}:{h:g}" for w, h in setting.aspect_ratios)
    return (f"w:h {ratios} x {setting.num_scales} scales, anchor_scale {setting.anchor_scale:g} "
            f"({setting.anchors_per_location} per location)")


def format_anchor_fit(fit: AnchorFit) -> list[str]:
    """The "anchors" section of ``densekit inspect``: the recall of the config's anchors and of each suggestion, and
    the overrides to paste."""
    g = fit.geometry
    width = max([len(s.what) for s in fit.suggestions] + [len("the config's anchors")])
    lines = [f"recall: share of {fit.boxes} boxes an anchor reaches at IoU >= {g.match_iou:g} "
             f"({g.input_size[0]}x{g.input_size[1]} input, P{g.min_level}-P{g.max_level})"]
    for s in (fit.current, *fit.suggestions):
        lines.append(f"  {s.what:<{width}}  recall {s.recall:.3f}  {_describe(s.setting)}")
    best = fit.recommended
    if best is None:
        lines.append("  no other aspect ratios / anchor_scale / num_scales reach a higher recall: the anchors fit")
    else:
        lines.append(f"  suggested ({fit.current.recall:.3f} -> {best.recall:.3f}; another anchor count retrains "
                     "the head's output layers):")
        lines.append("    " + " ".join(shlex.quote(o) for o in best.setting.overrides()))
    return lines


def inspect_command(words: Sequence[Any]) -> str:
    """``words`` (e.g. :func:`densekit.cli.command.command_words` of ``inspect``) and the running Hydra job's
    ``model`` / ``data`` / ``weights`` overrides, as a command line to paste."""
    from hydra.core.hydra_config import HydraConfig

    overrides: list[str] = []
    if HydraConfig.initialized():
        keys = ("model", "data", "weights")
        overrides = [o for o in HydraConfig.get().overrides.task
                     if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] in keys]
    return " ".join(shlex.quote(str(w)) for w in [*words, *overrides])


def check_anchor_recall(cfg: Any, dataset: Any, command: Sequence[Any], max_boxes: int = TRAIN_CHECK_BOXES
                        ) -> float | None:
    """``densekit train``'s check after its datasets are built: the anchor recall of (at most ``max_boxes`` of) the
    training boxes, logged as a warning naming ``command`` (``densekit inspect``, with the run's model and data
    overrides) when below :data:`WARN_BELOW`.

    Returns:
        The recall; ``None`` for a model without anchors or a dataset without a COCO ground truth (segmentation).
    """
    coco = getattr(dataset, "coco", None)
    if "anchors" not in cfg.model or coco is None:
        return None
    from ..tasks.detection import input_size  # late: tasks import the models

    size = input_size(cfg.data, cfg.model)
    boxes = boxes_at_input_size(coco.dataset, size, max_boxes=max_boxes)
    geometry = AnchorGeometry.of(cfg.model, size)
    recall = anchor_recall(boxes, AnchorSetting.of(cfg.model.anchors), geometry)
    if recall < WARN_BELOW:
        log.warning(
            "anchor recall %.2f: %d%% of %d training boxes have no anchor with IoU >= %g at %d px (they train only "
            "through the one anchor the matcher forces onto each, at a lower IoU). For anchors fitted to these "
            "boxes (aspect ratios, scale) and the overrides that set them, run: %s",
            recall, round(100 * (1 - recall)), len(boxes), geometry.match_iou, size,
            inspect_command(command),
        )
    return recall
