"""The commands as Python functions, for notebooks: ``densekit.train(...)`` and ``densekit.evaluate(...)`` take the
overrides of ``densekit train`` / ``densekit eval`` and return the metrics.

    metrics = densekit.train("model=efficientdet_lite0", "train.epochs=3", run_dir="runs/lite0")
    metrics = densekit.evaluate(model="efficientdet_lite0", weights="runs/lite0/checkpoints/last.pth")
    metrics["AP"]

Overrides are Hydra's command-line strings, keyword arguments (``model="efficientdet_d0"``; nested dicts for groups of
keys, ``train={"epochs": 3}``), or both. The config is composed as the command composes it (the packaged configs and
``$DENSEKIT_CONF``), the run directory holds what the command writes there, and errors are raised as exceptions
(the commands print them as ``error:`` blocks). Log lines go to Python's logging as configured by the caller (the
commands also write them to ``<run_dir>/<command>.log``).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from .config import as_overrides

__all__ = ["evaluate", "train"]


def train(*overrides: str, run_dir: str | os.PathLike | None = None, **keys: Any) -> dict[str, Any]:
    """Run ``densekit train`` with these overrides in-process; returns the final metrics (e.g. ``AP``, ``mIoU``).

    ``run_dir`` is ``hydra.run.dir``: a new directory trains from scratch, an interrupted run's directory resumes it.
    """
    from .cli.train import train as run

    return _run("train", run, overrides, run_dir, keys)


def evaluate(*overrides: str, run_dir: str | os.PathLike | None = None, **keys: Any) -> dict[str, Any]:
    """Run ``densekit eval`` with these overrides in-process (``weights=`` the checkpoint or artifact); returns the
    metrics it writes to ``<run_dir>/metrics.json``."""
    from .cli.eval import evaluate as run

    return _run("eval", run, overrides, run_dir, keys)


def _run(command: str, run: Callable[[DictConfig], dict[str, Any]], overrides: tuple[str, ...],
         run_dir: str | os.PathLike | None, keys: Mapping[str, Any]) -> dict[str, Any]:
    """Compose ``command``'s config as Hydra would for the command line, make it the current Hydra job (the tools
    read their run directory and overrides from :class:`HydraConfig`), and run it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from .cli import user_conf  # noqa: F401  (registers $DENSEKIT_CONF's search path, as for the commands)
    from .config import register_configs
    from .modeling.build import config_dir

    register_configs()
    arguments = [*overrides, *as_overrides(keys)] + ([f"hydra.run.dir={Path(run_dir).resolve()}"] if run_dir else [])
    GlobalHydra.instance().clear()  # a notebook may have initialised Hydra before (a previous call included)
    with initialize_config_dir(str(config_dir()), version_base=None, job_name=command):
        cfg = compose(command, overrides=arguments, return_hydra_config=True)
    out_dir = Path(cfg.hydra.run.dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # the job's config, as the tool receives it
    OmegaConf.set_struct(job, True)
    return run(job)
