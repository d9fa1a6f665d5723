"""Reading checkpoint files and loading them all-or-nothing.

Every importer (densekit's own files, efficientdet-pytorch, efficientnet_pytorch, torchvision) ends in
:func:`load_state_dict_checked`, so a checkpoint that does not fit is refused with the full list of bad keys and
the model is left untouched, never loaded half-way.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or its tensors do not fit the model."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely (``weights_only=True``) and return its flat state_dict.

    Accepts a bare state_dict or the usual wrappers (``{"model": ...}``, ``{"state_dict": ...}``,
    ``{"state_dict_ema": ...}`` is *not* preferred silently: the plain weights are what a user saved).

    Raises:
        CheckpointError: the file is missing, unreadable, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / non-weights files
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state_dict (found {type(obj).__name__})")
    # Checkpoints saved from DataParallel / DDP prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_state_dict_checked(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``module`` only if every key and shape matches.

    Args:
        module: The model (or sub-module) to fill.
        state_dict: Tensors keyed as in ``module.state_dict()``.
        source: What the tensors came from, quoted in the error.

    Raises:
        CheckpointError: listing missing, unexpected and wrongly shaped keys. The module is unchanged.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(format_key_report(source, missing, unexpected, mismatched))
    module.load_state_dict(state_dict, strict=True)


def format_key_report(source: str, missing: list[str], unexpected: list[str], mismatched: list[str], limit: int = 20) -> str:
    """One readable message naming the keys that kept a checkpoint from loading."""

    def block(title: str, keys: list[str]) -> str:
        if not keys:
            return ""
        shown = "\n    ".join(keys[:limit])
        more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return f"\n  {title} ({len(keys)}):\n    {shown}{more}"

    return (
        f"{source} does not fit the model; nothing was loaded."
        + block("missing keys", missing)
        + block("unexpected keys", unexpected)
        + block("wrongly shaped keys", mismatched)
    )
