"""Atomic checkpoints and resume: a crash mid-save never leaves a corrupt file as the latest checkpoint."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..modeling.checkpoint_io import CheckpointError

LAST = "last.pth"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``.

    ``os.replace`` is atomic on POSIX and Windows, so readers see either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any], keep_step_copy: bool = False) -> Path:
    """Write ``state`` as ``<directory>/last.pth`` (atomically); optionally also ``step_<N>.pth``."""
    directory = Path(directory)
    path = directory / LAST
    atomic_save(state, path)
    if keep_step_copy:
        atomic_save(state, directory / f"step_{int(state['step']):08d}.pth")
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (``weights_only=True``: tensors, numbers, strings, dicts and lists only)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read training checkpoint {path}: {err}") from err


def find_resume_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from in a run directory, or None for a fresh run."""
    path = Path(directory) / LAST
    return path if path.is_file() else None
