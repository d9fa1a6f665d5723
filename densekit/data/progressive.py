"""Progressive learning (EfficientNetV2, Tan & Le 2021): train small images with weak augmentation first and grow
both with the epochs, so that most steps are cheap and the last stage trains at the full size.

``train.progressive_stages=N`` splits the schedule into N stages of (about) equal epochs. Stage ``k`` trains at
``lerp(progressive_min_size, 1, k / (N - 1))`` of the full size (rounded to ``multiple``, so every stage has one
static shape) with the scale jitter's half-width at ``lerp(progressive_min_jitter, 1, k / (N - 1))`` of the
configured one (same centre). The task turns a stage into data config overrides (:meth:`Task.stage_overrides`);
:class:`StagedLoader` gives the trainer the loader of each epoch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Stage", "StagedLoader", "plan_stages", "stage_scale_range", "stage_size"]


@dataclass(frozen=True)
class Stage:
    """One stage: from ``first_epoch`` on, images at ``size_fraction`` of the full size, jitter at ``jitter_fraction``."""

    first_epoch: int
    size_fraction: float
    jitter_fraction: float


def plan_stages(num_stages: int, epochs: int, min_size: float, min_jitter: float) -> list[Stage]:
    """The stages of a run of ``epochs`` epochs (``num_stages <= 1``: one stage at the full size and jitter)."""
    if num_stages <= 1:
        return [Stage(0, 1.0, 1.0)]
    if not 0 < min_size <= 1 or not 0 <= min_jitter <= 1:
        raise ValueError(
            f"train.progressive_min_size must be in (0, 1] and train.progressive_min_jitter in [0, 1], "
            f"got {min_size} and {min_jitter}"
        )
    if epochs < num_stages:
        raise ValueError(f"train.progressive_stages={num_stages} needs at least as many epochs, the run has {epochs}")
    stages = []
    for k in range(num_stages):
        t = k / (num_stages - 1)
        stages.append(Stage(k * epochs // num_stages, min_size + (1 - min_size) * t, min_jitter + (1 - min_jitter) * t))
    return stages


def stage_size(full: int, fraction: float, multiple: int) -> int:
    """``full * fraction`` rounded to a multiple of ``multiple`` (at least one multiple; the full size stays as is)."""
    if fraction >= 1.0:
        return int(full)
    return max(multiple, int(round(full * fraction / multiple)) * multiple)


def stage_scale_range(scale_range: Sequence[float], jitter_fraction: float) -> list[float]:
    """``scale_range`` narrowed around its centre to ``jitter_fraction`` of its half-width."""
    lo, hi = float(scale_range[0]), float(scale_range[1])
    centre, half = (lo + hi) / 2, (hi - lo) / 2 * jitter_fraction
    return [centre - half, centre + half]


class StagedLoader:
    """One loader per stage, all with the same number of batches per epoch; :meth:`for_epoch` picks the one of an
    epoch (the trainer asks at every epoch start, so resuming mid-run lands in the right stage).

    Args:
        stages: ``(first_epoch, loader)`` pairs, the first at epoch 0, in order.
        descriptions: What each stage trains at, for the log (e.g. ``"160 px, scale 0.88-1.12"``).
    """

    def __init__(self, stages: Sequence[tuple[int, Any]], descriptions: Sequence[str] = ()) -> None:
        if not stages or stages[0][0] != 0:
            raise ValueError("the first stage must start at epoch 0")
        lengths = {len(loader) for _, loader in stages}
        if len(lengths) != 1:
            raise ValueError(f"every stage's loader must have the same number of batches per epoch, got {sorted(lengths)}")
        self.stages = list(stages)
        self.descriptions = list(descriptions)

    def __len__(self) -> int:
        return len(self.stages[0][1])

    def stage_index(self, epoch: int) -> int:
        return max(i for i, (first, _) in enumerate(self.stages) if first <= epoch)

    def for_epoch(self, epoch: int) -> Any:
        return self.stages[self.stage_index(epoch)][1]
