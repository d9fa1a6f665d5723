"""The Task interface: everything the tools and the trainer need to know about one kind of dense prediction.

A task owns its data format (``data.format`` values), dataset and loader building, the class count a dataset
implies, the check that a model fits a dataset, the evaluation loop, the headline metric, the model summary and
the ONNX export wrapper and the prediction path. Tools ask the task; :func:`densekit.tasks.get_task` is the one place that maps a config
to a task. A new task (instance segmentation, say) is one new module here that registers itself in :data:`TASKS`,
plus its configs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.loader import build_loader
from ..data.progressive import Stage
from ..modeling.registry import Registry

if TYPE_CHECKING:
    from ..deploy.predictions import Inference

EvaluateFn = Callable[[nn.Module], dict[str, Any]]


class Task(ABC):
    """One kind of dense prediction: its data, its models' architecture, its evaluation and its reports."""

    #: Registry name, e.g. ``"detection"``.
    name: ClassVar[str]
    #: The model meta-architecture this task trains (a name in ``densekit.modeling.registry.META_ARCHS``).
    arch: ClassVar[str]
    #: The ``data.format`` values whose datasets this task reads.
    data_formats: ClassVar[tuple[str, ...]]

    @abstractmethod
    def build_dataset(self, cfg: Any, split: str, train: bool) -> Dataset:
        """The ``split`` dataset of ``cfg.data`` with the train or eval transform for ``cfg.model``."""

    @abstractmethod
    def stage_overrides(self, cfg: Any, stage: Stage, multiple: int) -> tuple[dict[str, Any], str]:
        """Progressive learning: the ``data`` config overrides of ``stage`` (its image or crop size, a multiple of
        ``multiple``, and its scale jitter) and a description of them for the log."""

    def build_loader(
        self, dataset: Dataset, batch_size: int, train: bool, num_workers: int, distributed: bool, seed: int = 0
    ) -> DataLoader:
        """A loader for ``dataset`` (resumable sampling, reproducible seeding; see :func:`build_loader`)."""
        return build_loader(
            dataset, batch_size, train=train, num_workers=num_workers, distributed=distributed, seed=seed
        )

    @abstractmethod
    def num_classes(self, dataset: Dataset) -> int:
        """Classes a model trained on ``dataset`` predicts."""

    @abstractmethod
    def class_names(self, dataset: Dataset) -> list[str]:
        """The name of each label a model trained on ``dataset`` predicts (``num_classes`` of them)."""

    @abstractmethod
    def check_model_fits_data(self, model: nn.Module, dataset: Dataset) -> None:
        """Raise ``ValueError`` before any work when ``model`` cannot be scored on ``dataset``."""

    @abstractmethod
    def make_evaluate(self, cfg: Any, dataset: Dataset, loader: DataLoader, device: torch.device, out_dir: Path) -> EvaluateFn:
        """``evaluate(model) -> metrics`` over ``loader``, writing the task's result files under ``out_dir``."""

    @abstractmethod
    def headline(self, metrics: dict[str, Any]) -> str:
        """The one line a user looks for at the end of a run."""

    @abstractmethod
    def summary(self, model: nn.Module, size: tuple[int, int]) -> str:
        """A one-screen description of ``model`` (parts, parameters, MACs, outputs) for an input of ``size``."""


    @abstractmethod
    def export_module(self, model: nn.Module, image_size: tuple[int, int], postprocess: bool) -> tuple[nn.Module, list[str]]:
        """The module ONNX export traces for ``model`` at ``image_size`` and the names of its outputs."""

    @abstractmethod
    def inference(self, model_cfg: Any, image_size: Any, score_threshold: float) -> Inference:
        """How a ``model_cfg`` model predicts on a user's photo (:class:`densekit.Predictor`, tools/predict.py): the
        task's evaluation transform at ``image_size`` (an int, ``[H, W]``, or ``None`` for the task's evaluation
        default) and the mapping of outputs back to original-image pixels; ``score_threshold`` filters boxes."""


#: Tasks by name; each task module registers an instance.
TASKS: Registry[Task] = Registry("task", "task")
