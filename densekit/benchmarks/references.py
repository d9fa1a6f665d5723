"""The implementations users would otherwise pick, built as twins of a densekit model for side-by-side benchmarks.

The only module of densekit's code that imports efficientdet-pytorch (``effdet``, a dev-only extra) or builds a
reference model. A twin has the same architecture and the same weights as the densekit model (the weights are
copied *from* the reference into densekit, through the same converters ``weights=`` uses), so both compute the same
outputs and, for detectors, post-process the same candidates:

* EfficientDet / EfficientDet-Lite: efficientdet-pytorch ``EfficientDet`` (network), ``DetBenchPredict`` (end to
  end: anchors, top-k, decoding, NMS) and ``DetBenchTrain`` (a training step's loss);
* LR-ASPP MobileNetV3-Large: torchvision's ``lraspp_mobilenet_v3_large`` (network: its ``"out"`` logits at the
  input resolution; end to end: their argmax).

References take an input that is already normalised (neither effdet nor torchvision normalises inside the model).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from densekit.checkpoint.io import CheckpointError, load_state_dict_checked
from densekit.checkpoint.convert import convert_effdet, convert_torchvision_lraspp
from densekit.tasks import task_of_model
from densekit.tasks.detection import DetectionTask
from densekit.tasks.segmentation import SegmentationTask
from densekit.utils import count_parameters

#: densekit models with a torchvision segmentation twin (torchvision has no LR-ASPP on MobileNetV3-Small).
TORCHVISION_SEGMENTERS = {"lraspp_mobilenet_v3_large": "lraspp_mobilenet_v3_large"}


class NoReferenceError(ValueError):
    """The model has no reference twin, the reference is not installed, or its architecture differs from the
    configured model."""


@dataclass
class ReferenceModel:
    """A reference implementation of a densekit model, with the densekit model's weights.

    Attributes:
        label: Short name for tables ("effdet", "torchvision").
        name: The reference's own model name.
        network: Module mapping a normalised ``[B, 3, H, W]`` batch to the raw network outputs.
        end_to_end: Module mapping the same batch to final predictions (detections / label maps).
        end_to_end_on: Where the end-to-end path is the network plus eager post-processing (effdet's
            ``DetBenchPredict``), builds it around another network module, e.g. the compiled one, so that a compiled
            comparison compiles the network once as densekit does; ``None`` where the end-to-end module is compiled
            as a whole.
    """

    label: str
    name: str
    network: nn.Module
    end_to_end: nn.Module
    end_to_end_on: Callable[[nn.Module], nn.Module] | None = None


def effdet_counterpart(name: str) -> str | None:
    """The efficientdet-pytorch model that ``conf/model/<name>`` reproduces, or None if it has none.

    densekit's ``efficientdet_dN`` / ``efficientdet_liteN`` are the TF-ported ``tf_efficientdet_dN`` /
    ``tf_efficientdet_liteN`` (TF 'SAME' padding, conv bias before BN). When effdet is installed, the name is
    checked against its model registry.
    """
    candidate = f"tf_{name}"
    try:
        from effdet.config.model_config import efficientdet_model_param_dict
    except ImportError:  # effdet is a dev-only dependency: answer from the naming rule alone
        return candidate if name.startswith("efficientdet_") else None
    return candidate if candidate in efficientdet_model_param_dict else None


def effdet_network(name: str, image_size: Sequence[int], num_classes: int | None = None) -> nn.Module:
    """effdet's ``EfficientDet`` ``name``, freshly initialised, on the current default device (e.g. meta).

    Args:
        name: An effdet model name, e.g. ``"tf_efficientdet_d0"`` (see :func:`effdet_counterpart`).
        image_size: Input ``(H, W)``: effdet fixes its BiFPN resampling sizes and its anchors at construction.
        num_classes: Classes of the head; None keeps effdet's (90, COCO).

    Raises:
        NoReferenceError: effdet is not installed.
    """
    try:
        from effdet import EfficientDet, get_efficientdet_config
    except ImportError as err:
        raise NoReferenceError("comparing with effdet needs efficientdet-pytorch: pip install effdet") from err
    cfg = get_efficientdet_config(name)
    if num_classes is not None:
        cfg.num_classes = num_classes
    cfg.image_size = list(image_size)
    return EfficientDet(cfg, pretrained_backbone=False)


def effdet_twin_network(model: nn.Module, size: Sequence[int]) -> tuple[nn.Module, str]:
    """effdet's network for the densekit detector ``model`` at input ``size`` (H, W), and its effdet name.

    ``model`` (not yet optimised) receives the new network's weights. Raises :class:`NoReferenceError` with the
    reason when there is no twin.
    """
    name = model.config.name
    effdet_name = effdet_counterpart(name)
    if effdet_name is None:
        raise NoReferenceError(
            f"{name!r} has no reference implementation (known: efficientdet_d0-d7x and efficientdet_lite0-4 in "
            f"efficientdet-pytorch, {', '.join(TORCHVISION_SEGMENTERS)} in torchvision)"
        )
    ref = effdet_network(effdet_name, size, model.config.num_classes)
    state = convert_effdet(ref.state_dict(), len(model.backbone.feature_specs))
    _check_and_load(model, ref, state, f"effdet's {effdet_name}")
    return ref, effdet_name


def effdet_train_twin(model: nn.Module, size: Sequence[int]) -> tuple[nn.Module, str]:
    """effdet's ``DetBenchTrain`` (in training mode) around the twin of ``model``, and the effdet model's name.

    Called as ``bench(normalised_images, effdet_targets(targets))["loss"]``; ``bench.model`` holds the parameters.
    """
    ref, effdet_name = effdet_twin_network(model, size)
    from effdet import DetBenchTrain  # after the twin: a missing effdet is a NoReferenceError from there

    return DetBenchTrain(ref).train(), effdet_name


def effdet_targets(targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """densekit's training targets (xyxy ``boxes``, 0-based ``labels``; as many per image) in effdet's batch format."""
    return {
        "bbox": torch.stack([t["boxes"][:, [1, 0, 3, 2]] for t in targets]),  # effdet wants yxyx
        "cls": torch.stack([t["labels"] + 1 for t in targets]).float(),  # and 1-based classes
    }


class _EffdetPredict(nn.Module):
    """``DetBenchPredict`` with a fixed ``img_info`` that makes effdet clip boxes to the image, as densekit does.

    ``network`` replaces the bench's model for the forward pass (e.g. a compiled copy of ``model``).
    """

    def __init__(self, model: nn.Module, batch: int, size: tuple[int, int], network: nn.Module | None = None) -> None:
        super().__init__()
        from effdet import DetBenchPredict

        self.bench = DetBenchPredict(model)
        if network is not None:
            self.bench.model = network
        self.register_buffer("img_scale", torch.ones(batch), persistent=False)
        self.register_buffer("img_size", torch.tensor([[size[1], size[0]]] * batch), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bench(x, {"img_scale": self.img_scale, "img_size": self.img_size})


class _SegmentationOut(nn.Module):
    """torchvision's segmentation model -> its ``"out"`` logits, or their per-pixel argmax."""

    def __init__(self, model: nn.Module, argmax: bool) -> None:
        super().__init__()
        self.model = model
        self.argmax = argmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)["out"]
        return out.argmax(1) if self.argmax else out


def reference_twin(model: nn.Module, size: tuple[int, int], batch: int) -> ReferenceModel:
    """The reference implementation of ``model`` at input ``size`` (H, W) and ``batch``, sharing its weights.

    ``model`` (a densekit model on the CPU, not yet optimised) receives the reference's freshly initialised
    weights. Raises :class:`NoReferenceError` with the reason when there is no twin.
    """
    twin = _TWIN_OF_TASK[type(task_of_model(model.config))]
    return twin(model, size, batch)


def _effdet_twin(model: nn.Module, size: tuple[int, int], batch: int) -> ReferenceModel:
    ref, effdet_name = effdet_twin_network(model, size)
    ref.eval()
    return ReferenceModel(
        "effdet", effdet_name, ref, _EffdetPredict(ref, batch, size).eval(),
        end_to_end_on=lambda network: _EffdetPredict(ref, batch, size, network).eval(),
    )


def _check_and_load(model: nn.Module, ref: nn.Module, state: dict[str, torch.Tensor], ref_name: str) -> None:
    name = model.config.name
    ours_n, ref_n = count_parameters(model), count_parameters(ref)
    if ours_n != ref_n:  # the short answer for the common case, an architecture override the reference lacks
        raise NoReferenceError(
            f"densekit's {name} as configured has {ours_n:,} parameters, {ref_name} {ref_n:,}: not the same model "
            "(drop the architecture overrides to compare)"
        )
    try:
        load_state_dict_checked(model, state, ref_name)
    except CheckpointError as err:
        raise NoReferenceError(f"densekit's {name} (with the given overrides) is not {ref_name}:\n{err}") from err


def _torchvision_twin(model: nn.Module, name: str) -> ReferenceModel:
    tv_name = TORCHVISION_SEGMENTERS.get(name)
    if tv_name is None:
        raise NoReferenceError(
            f"{name!r} has no reference implementation (torchvision's segmentation models cover "
            f"{', '.join(TORCHVISION_SEGMENTERS)}; effdet covers the EfficientDet family)"
        )
    from torchvision.models import segmentation

    ref = getattr(segmentation, tv_name)(weights=None, weights_backbone=None, num_classes=model.num_classes).eval()
    _check_and_load(model, ref, convert_torchvision_lraspp(ref.state_dict()), f"torchvision's {tv_name}")
    return ReferenceModel(
        "torchvision", tv_name, _SegmentationOut(ref, argmax=False).eval(), _SegmentationOut(ref, argmax=True).eval()
    )


#: The reference implementation of each task's models: effdet for detectors, torchvision for segmenters.
_TWIN_OF_TASK: dict[type, Callable[[nn.Module, tuple[int, int], int], ReferenceModel]] = {
    DetectionTask: _effdet_twin,
    SegmentationTask: lambda model, size, batch: _torchvision_twin(model, model.config.name),
}
