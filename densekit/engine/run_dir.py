"""Run directories that never lie: one training at a time, and a resume that trains what the directory holds.

``tools/train.py`` resumes a run when it is started again with the same ``hydra.run.dir``. Three rules keep the
directory's record (``checkpoints/last.pth`` with the config it was written with, ``.hydra/``, ``metrics.json``)
true:

1. :class:`RunDirLock`: an advisory lock (``fcntl.flock`` on ``<run dir>/train.lock``, which holds the owner's pid and
   host) is taken before anything is written; a second training on the same directory is refused with the owner's
   name. The kernel releases a flock when its process dies, so the lock of a killed run is taken over silently.
2. :func:`check_resume`: the new config is compared with the one the checkpoint was written with. The keys that
   may change on resume are listed in :data:`RESUMABLE_KEYS` (the one place that decides); a change of any other
   key (the model, the data, batch size, lr, optimiser, schedule, epochs / steps, seed, ...) is refused with the
   diff and the two ways out.
3. :func:`write_hydra_record`: ``.hydra/`` is written by the tool after that check (``hydra.output_subdir: null``
   in ``conf/train.yaml`` stops Hydra writing it at job start), atomically.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import OmegaConf

from ..checkpoint.io import atomic_write
from ..checkpoint.train_state import find_resume_checkpoint, load_checkpoint
from ..config import flatten_config

log = logging.getLogger(__name__)

__all__ = ["RESUMABLE_KEYS", "DERIVED_KEYS", "RunDirError", "RunDirLock", "check_resume", "config_diff",
           "write_hydra_record"]

# Config keys (dotted prefixes: "eval" covers eval.batch_size, eval.visualize, ...) that may change when a run
# resumes: where and how fast it runs, how often it logs, checkpoints and evaluates, how it is evaluated. They do
# not change what the remaining steps train. Every other key is training-defining and must stay as it was.
RESUMABLE_KEYS: tuple[str, ...] = (
    "device",
    "train.num_workers",
    "train.log_every",
    "train.checkpoint_every",
    "train.eval_every_epochs",
    "train.compile",
    "train.channels_last",
    "train.loggers", "train.mlflow_uri", "train.experiment_name", "train.run_name", "train.wandb_project",  # loggers
    "data.decoder",  # every decoder gives the same pixels (docs/benchmarks.md)
    "data.skip_unreadable",  # leave out images that cannot be read: what a run stopped by a read error resumes with
    "eval",
)
# Keys not compared: the model's classes come from the dataset (the data keys are compared instead).
DERIVED_KEYS: tuple[str, ...] = ("model.num_classes", "model.class_names")

LOCK_NAME = "train.lock"
_ABSENT = "<absent>"


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (locked, or holding a run of another config)."""


def _matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for every leaf that differs (``"<absent>"`` where one side lacks it), without
    :data:`DERIVED_KEYS`."""
    a, b = flatten_config(old), flatten_config(new)
    keys = list(b) + [key for key in a if key not in b]  # the new config's order
    return {
        key: (a.get(key, _ABSENT), b.get(key, _ABSENT))
        for key in keys
        if not _matches(key, DERIVED_KEYS) and a.get(key, _ABSENT) != b.get(key, _ABSENT)
    }


def _lines(diff: Mapping[str, tuple[Any, Any]]) -> str:
    return "\n".join(f"  {key}: {old} -> {new}" for key, (old, new) in diff.items())


def check_resume(run_dir: str | os.PathLike, new_config: Mapping[str, Any]) -> dict[str, tuple[Any, Any]] | None:
    """Compare ``new_config`` (resolved, plain containers, the model config as training saves it) with the config
    of ``<run_dir>/checkpoints/last.pth``.

    Returns:
        None for a fresh run (no checkpoint), else the accepted changes (:data:`RESUMABLE_KEYS`), logged in one line.

    Raises:
        RunDirError: another model, or a training-defining key changed; the message lists the diff and the ways out.
        CheckpointError: the checkpoint cannot be read.
    """
    run_dir = Path(run_dir)
    path = find_resume_checkpoint(run_dir / "checkpoints")
    if path is None:
        return None
    state = load_checkpoint(path)
    old = state.get("config")
    if not old:
        log.warning("%s holds no config (written by an older densekit?): resuming without comparing configs", path)
        return {}
    step = state.get("step", "?")
    ways_out = (f"Resume with the config this run was written with (see {run_dir / '.hydra' / 'config.yaml'} and "
                f"{run_dir / '.hydra' / 'overrides.yaml'}), or start a new run in another directory "
                f"(hydra.run.dir=<new dir>).")
    old_model, new_model = old.get("model", {}).get("name"), new_config.get("model", {}).get("name")
    if old_model != new_model:
        raise RunDirError(
            f"this run directory holds an {old_model} run ({path}, step {step}), and this command trains "
            f"{new_model}: a checkpoint of one model cannot resume another. Resume it with model={old_model} (and "
            f"the rest of its config), or train {new_model} in a new run directory (hydra.run.dir=<new dir>)."
        )
    diff = config_diff(old, new_config)
    refused = {k: v for k, v in diff.items() if not _matches(k, RESUMABLE_KEYS)}
    accepted = {k: v for k, v in diff.items() if _matches(k, RESUMABLE_KEYS)}
    if refused:
        raise RunDirError(
            f"{run_dir} holds a run at step {step} ({path}) written with another config; these training-defining "
            f"keys differ (old -> new):\n{_lines(refused)}\n{ways_out}"
        )
    if accepted:
        log.info("resuming %s with changed settings that may change on resume: %s", run_dir,
                 "; ".join(f"{key}: {old} -> {new}" for key, (old, new) in accepted.items()))
    return accepted


class RunDirLock:
    """An advisory lock on a run directory (``<run dir>/train.lock`` holding ``pid <pid> host <host>``).

    ``acquire`` raises :class:`RunDirError` naming the owner when another process holds it. The file stays after
    release (removing it would race with a process taking it); its flock, not its existence, is the lock.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._file: Any = None

    def acquire(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise RunDirError(
                f"{self.path.parent} is in use by another training ({owner}; lock file {self.path}). Wait for it to "
                f"finish (or stop it), or train in another directory (hydra.run.dir=<new dir>)."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} host {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def write_hydra_record(run_dir: str | os.PathLike, config: Any, overrides: Iterable[str], hydra: Any = None) -> None:
    """``<run_dir>/.hydra/config.yaml`` (unresolved, as Hydra writes it), ``overrides.yaml`` and, given the Hydra
    config, ``hydra.yaml``; each atomically."""
    out = Path(run_dir) / ".hydra"
    files = {"config.yaml": OmegaConf.to_yaml(config), "overrides.yaml": OmegaConf.to_yaml(list(overrides))}
    if hydra is not None:
        files["hydra.yaml"] = OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra}))
    for name, text in files.items():
        with atomic_write(out / name, "w") as f:
            f.write(text)
