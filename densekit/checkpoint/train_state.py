"""Training states: atomic checkpoints of a run and resume, so a crash mid-save never leaves a corrupt latest file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .io import CheckpointError, atomic_write, read_checkpoint

LAST = "last.pth"


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any], keep_step_copy: bool = False) -> Path:
    """Write ``state`` as ``<directory>/last.pth`` (atomically); optionally also ``step_<N>.pth``."""
    directory = Path(directory)
    path = directory / LAST
    targets = [path, directory / f"step_{int(state['step']):08d}.pth"] if keep_step_copy else [path]
    for target in targets:
        with atomic_write(target) as f:
            torch.save(state, f)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state that :func:`save_checkpoint` wrote (``weights_only=True``, see :func:`read_checkpoint`).

    Raises:
        CheckpointError: the file is missing, unreadable, or holds something other than a dict of state.
    """
    state = read_checkpoint(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{os.fspath(path)} is not a training checkpoint (found {type(state).__name__})")
    return state


def find_resume_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from in a run directory, or None for a fresh run."""
    path = Path(directory) / LAST
    return path if path.is_file() else None
