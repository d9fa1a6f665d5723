"""Tasks (detection, segmentation): what the tools and the trainer ask about data, evaluation and reports.

:func:`get_task` is the one place where a config is mapped to its task; nothing else compares task or
architecture names. It also refuses a data key that the data config's dataset layout does not read
(:func:`check_data_keys`): ``data`` has no Hydra schema, so a typo'd key would otherwise pass silently.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any

from ..modeling.build import config_dirs, list_models
from .base import DATA_LAYOUTS, TASKS, DataLayout, EvaluateFn, Task, data_layout, unknown_data_keys

# Every module here registers its task on import; importing them all means a new task is one new file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DATA_LAYOUTS", "TASKS", "DataLayout", "EvaluateFn", "Task", "check_data_keys", "data_layout", "get_task",
           "task_of_model"]


def task_of_model(model_cfg: Any) -> Task:
    """The task a model config's architecture serves (for tools that have no data config: summary, export)."""
    task = TASKS.find("arch", model_cfg.arch)
    if task is None:
        known = sorted(other.arch for other in TASKS.values())
        raise ValueError(f"model {model_cfg.name}: no task trains arch {model_cfg.arch!r}; known: {known}")
    return task


def get_task(cfg: Any) -> Task:
    """The task of ``cfg.data.format``; raises if ``cfg.data`` has a key its dataset layout does not read
    (:func:`check_data_keys`) or ``cfg.model`` is built for another task."""
    task = TASKS.find("data_formats", cfg.data.format)
    if task is None:
        known = sorted(fmt for other in TASKS.values() for fmt in other.data_formats)
        raise ValueError(f"data.format {cfg.data.format!r} is unknown; expected one of {known}")
    check_data_keys(cfg.data)
    if cfg.model.arch != task.arch:
        raise ValueError(
            f"model={cfg.model.name} (arch {cfg.model.arch}) does not fit data={cfg.data.name}, a {task.name} dataset; "
            f"pick an arch {task.arch} model: {', '.join(list_models(arch=task.arch))}"
        )
    return task


def check_data_keys(data_cfg: Any) -> None:
    """Refuse the keys of a data config that its dataset layout does not read (its schema in
    :mod:`densekit.config`): a typo'd key in a data YAML or a ``+data.<key>=`` override.

    Raises:
        ValueError: naming each unknown key, where it came from (the override, else the data YAML), its closest
            valid key and the valid keys.
    """
    layout = data_layout(data_cfg)
    unknown = unknown_data_keys(data_cfg, layout)
    if not unknown:
        return
    lines = []
    for full_key, valid in unknown:
        parent, _, key = full_key.rpartition(".")
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"; did you mean {parent}.{close[0]}?" if close else ""
        lines.append(f"unknown data key {full_key} (from {_source_of(full_key, data_cfg)}){hint}")
    what = f"a data.format={layout.format} dataset laid out as {layout.name} ({layout.description})"
    lines.append(f"valid keys of {what}:")
    for parent, valid in dict((full_key.rpartition(".")[0], valid) for full_key, valid in unknown).items():
        lines.append(f"  {parent}: {', '.join(valid)}")
    raise ValueError("\n".join(lines))


def _source_of(full_key: str, data_cfg: Any) -> str:
    """Where a data key came from: the command-line override that sets it, else the data YAML Hydra chose (its file
    in the config folders), else (no Hydra run: the Python API) the data config's name."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return f"data={data_cfg.get('name')}"
    hydra = HydraConfig.get()
    for override in hydra.overrides.task:
        name = override.split("=", 1)[0].lstrip("+~")
        if name.startswith("data.") and (full_key == name or full_key.startswith(name + ".")):
            return f"the override {override}"
    choice = hydra.runtime.choices.get("data")
    files = [folder / "data" / f"{choice}.yaml" for folder in config_dirs()]
    found = next((str(path) for path in files if path.is_file()), None)
    return f"data={choice}" + (f", {found}" if found else "")
