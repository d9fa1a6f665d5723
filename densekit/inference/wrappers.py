"""One place where a detector is wrapped for test-time augmentation and / or sliced inference, for ``densekit eval``,
``densekit predict`` and :class:`densekit.Predictor` alike."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..deploy.formats import artifact_of
from .slicing import SliceSettings, SlicedDetector
from .tta import DetectionTTA, TTASettings


def check_applicable(task_name: str, model: nn.Module, tta: TTASettings | None, slicing: SliceSettings | None,
                     where: str) -> None:
    """Refuse TTA / slicing where they cannot run, naming the ``where`` config section (``eval`` / ``predict``)."""
    if tta is None and slicing is None:
        return
    if task_name != "detection":
        raise ValueError(
            f"{where}.tta / {where}.slice are for detection; a segmentation model averages flipped and rescaled "
            "passes with data.eval_flip=true data.eval_scales=[0.75,1.0,1.25] (evaluation) instead")
    artifact = artifact_of(model)
    if artifact is not None and (slicing is not None or (tta is not None and tta.scales != (1.0,))):
        raise ValueError(
            f"{where}.slice and {where}.tta_scales other than [1.0] resize the model's input, but the exported "
            f"artifact runs one fixed input size {list(artifact.info.image_size)}: use PyTorch weights (a checkpoint) "
            f"or {where}.tta_scales=[1.0] (flip only)")


def wrap_detector(model: nn.Module, tta: TTASettings | None, slicing: SliceSettings | None, input_size: int,
                  score_threshold: float = 0.0) -> nn.Module:
    """``model`` with TTA on each pass (innermost) and slicing around it; ``model`` itself when both are off.

    With slicing the wrapper takes full-resolution images (see :class:`SlicedDetector`); ``input_size`` is the side
    tiles are resized to (the model's evaluation size).
    """
    wrapped: nn.Module = model
    if tta is not None:
        wrapped = DetectionTTA(wrapped, tta, score_threshold=score_threshold)
    if slicing is not None:
        wrapped = SlicedDetector(wrapped, slicing, input_size, score_threshold=score_threshold)
    return wrapped


def describe(tta: TTASettings | None, slicing: SliceSettings | None) -> str | None:
    """A log line for what wraps the model, ``None`` for the plain model."""
    parts = [s.describe() for s in (slicing, tta) if s is not None]
    return "; ".join(parts) if parts else None


def settings_of(section: Any) -> tuple[TTASettings | None, SliceSettings | None]:
    """The TTA and slicing settings of an ``eval`` / ``predict`` config section."""
    return TTASettings.from_config(section), SliceSettings.from_config(section)
