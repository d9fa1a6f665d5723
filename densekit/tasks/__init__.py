"""Tasks (detection, segmentation): what the tools and the trainer ask about data, evaluation and reports.

:func:`get_task` is the one place where a config is mapped to its task; nothing else compares task or
architecture names.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from ..modeling.build import list_models
from .base import TASKS, EvaluateFn, Task

# Every module here registers its task on import; importing them all means a new task is one new file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TASKS", "EvaluateFn", "Task", "get_task", "task_of_model"]


def _all_tasks() -> list[Task]:
    return [TASKS.get(name) for name in TASKS]


def task_of_model(model_cfg: Any) -> Task:
    """The task a model config's architecture serves (for tools that have no data config: summary, export)."""
    by_arch = {task.arch: task for task in _all_tasks()}
    if model_cfg.arch not in by_arch:
        raise ValueError(f"model {model_cfg.name}: no task trains arch {model_cfg.arch!r}; known: {sorted(by_arch)}")
    return by_arch[model_cfg.arch]


def get_task(cfg: Any) -> Task:
    """The task of ``cfg.data.format``; raises if ``cfg.model`` is built for another task."""
    by_format = {fmt: task for task in _all_tasks() for fmt in task.data_formats}
    if cfg.data.format not in by_format:
        raise ValueError(f"data.format {cfg.data.format!r} is unknown; expected one of {sorted(by_format)}")
    task = by_format[cfg.data.format]
    if cfg.model.arch != task.arch:
        raise ValueError(
            f"model={cfg.model.name} (arch {cfg.model.arch}) does not fit data={cfg.data.name}, a {task.name} dataset; "
            f"pick an arch {task.arch} model: {', '.join(list_models(arch=task.arch))}"
        )
    return task
