"""The Task interface: everything the tools and the trainer need to know about one kind of dense prediction.

A task owns its data format (``data.format`` values), dataset and loader building, the class count a dataset
implies, the check that a model fits a dataset, the evaluation loop, the headline metric, the model summary and
the ONNX export wrapper and the prediction path. Tools ask the task; :func:`densekit.tasks.get_task` is the one place that maps a config
to a task. A new task (instance segmentation, say) is one new module here that registers itself in :data:`TASKS`,
plus its configs.

A ``data.format`` may come in several layouts (COCO: the official tree under ``data.root``, a json + image folder per
split, the generated synthetic shapes): each is a :class:`DataLayout` in :data:`DATA_LAYOUTS`, with the data keys it
reads (its schema) and its builder, so that a data config's keys are checked against the layout it selects.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import checks
from ..data.checks import DatasetFiles, ImageProblem
from ..data.loader import build_loader
from ..data.progressive import Stage
from ..engine import distributed as dist_utils
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

    def image_files(self, cfg: Any, dataset: Dataset, split: str) -> DatasetFiles | None:
        """The files of ``dataset`` that :meth:`check_images` reads (the dataset's ``listed_files``: images, with the
        sizes and label files they must fit); ``None`` for data that densekit's own generator wrote
        (``data.generate``: the synthetic datasets), which needs no check."""
        if cfg.data.get("generate", False):
            return None
        return dataset.listed_files(split)

    def check_images(self, cfg: Any, datasets: Mapping[str, Dataset]) -> list[tuple[str, ImageProblem]]:
        """Check the image files of ``datasets`` (by split name) before any training, from their headers:
        :func:`densekit.data.checks.check_images` with ``data.skip_unreadable``.

        Returns:
            The ``(split, problem)`` pairs left out with ``data.skip_unreadable=true`` (logged by the main process).

        Raises:
            DataError: Files that cannot be used, named, with what to do.
        """
        files = [f for split, ds in datasets.items() if (f := self.image_files(cfg, ds, split)) is not None]
        skip = bool(cfg.data.get("skip_unreadable", False))
        return checks.check_images(files, skip_unreadable=skip, report=dist_utils.is_main_process())

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


def skipped_note(metrics: dict[str, Any]) -> str:
    """What a headline adds when the evaluation left out unreadable images (``data.skip_unreadable``)."""
    count = metrics.get("skipped_images", 0)
    return f"  ({count} unreadable image{'s' if count > 1 else ''} not evaluated)" if count else ""


#: Tasks by name; each task module registers an instance. One task per ``data.format`` and per arch: a second task
#: for either is refused at registration, since :func:`densekit.tasks.get_task` / ``task_of_model`` look tasks up by them.
TASKS: Registry[Task] = Registry("task", "task", unique=("arch", "data_formats"))


@dataclass(frozen=True)
class DataLayout:
    """One way the datasets of a ``data.format`` are laid out: the data keys it reads and how it is built.

    Attributes:
        name: Its name in :data:`DATA_LAYOUTS` (``"coco_files"``).
        format: The ``data.format`` it is a layout of.
        description: What it is, for messages (``"a COCO json + image folder per split"``).
        schema: A dataclass of :mod:`densekit.config` naming every data key it reads, with conf/data's defaults.
        selects: Whether a data config of this format is laid out this way, from its keys. The layouts of one format
            select disjoint sets of configs (each predicate states the others' conditions), never by order.
        build: Its builder, called by its task with the task's signature (detection: ``(data_cfg, split) -> (image
            folder, json)``; segmentation: ``(data_cfg, split, train, pixel_mean) -> Dataset``).
    """

    name: str
    format: str
    description: str
    schema: type
    selects: Callable[[Any], bool]
    build: Callable[..., Any]


#: Dataset layouts by name; each task module registers those of its formats (a name once).
DATA_LAYOUTS: Registry[DataLayout] = Registry("data layout", "data.format")


def register_data_layout(layout: DataLayout) -> DataLayout:
    return DATA_LAYOUTS.register(layout.name)(layout)


def data_layout(data_cfg: Any, data_format: str | None = None) -> DataLayout:
    """The layout of a data config of ``data_format`` (default: its ``data.format``).

    Raises:
        ValueError: no layout serves the format.
        RuntimeError: not exactly one layout of the format selects the config (their predicates overlap or leave a
            gap: a registration bug).
    """
    data_format = data_format or data_cfg.format
    layouts = [layout for layout in DATA_LAYOUTS.values() if layout.format == data_format]
    if not layouts:
        known = sorted({layout.format for layout in DATA_LAYOUTS.values()})
        raise ValueError(f"data.format {data_format!r} has no dataset layout; known formats: {', '.join(known)}")
    chosen = [layout for layout in layouts if layout.selects(data_cfg)]
    if len(chosen) != 1:
        raise RuntimeError(
            f"data.format {data_format!r}: {len(chosen)} of its layouts ({', '.join(lo.name for lo in layouts)}) "
            f"select data={data_cfg.get('name')}; exactly one must"
        )
    return chosen[0]


def unknown_data_keys(data_cfg: Any, layout: DataLayout) -> list[tuple[str, list[str]]]:
    """The keys of ``data_cfg`` that ``layout`` does not read, as ``(data.<key>, the valid keys at that level)``;
    nested nodes (``augment``) are compared key by key too."""
    schema = OmegaConf.to_container(OmegaConf.structured(layout.schema))
    given = OmegaConf.to_container(data_cfg, resolve=False) if OmegaConf.is_config(data_cfg) else dict(data_cfg)
    return list(_unknown_keys(given, schema, "data"))


def _unknown_keys(given: Mapping[str, Any], schema: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, list[str]]]:
    for key, value in given.items():
        if key not in schema:
            yield f"{prefix}.{key}", sorted(schema)
        elif isinstance(value, Mapping) and isinstance(schema[key], Mapping):
            yield from _unknown_keys(value, schema[key], f"{prefix}.{key}")
