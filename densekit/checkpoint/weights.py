"""What a ``weights=`` argument names, read once: the tensors, where they came from, and what the file records
about the model they belong to (class count and class names of a densekit training run)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .io import read_checkpoint, state_dict_from


@dataclass
class ModelWeights:
    """The tensors of a ``weights=`` file and what it says about its model.

    Attributes:
        state_dict: Flat tensors, in the file's own layout (converted on load by ``load_state_dict_any``).
        source: Human-readable origin for messages, e.g. ``"EMA weights of run/checkpoints/last.pth"``.
        model_overrides: Model config keys the file records (``num_classes``, ``class_names``); empty for
            files that record nothing (plain state_dicts, efficientdet-pytorch / torchvision checkpoints).
    """

    state_dict: dict[str, torch.Tensor]
    source: str
    model_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str] | None:
        return self.model_overrides.get("class_names")


def _recorded_model(run: dict[str, Any]) -> dict[str, Any]:
    config = run.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        return {}
    return {key: model[key] for key in ("num_classes", "class_names") if model.get(key) is not None}


def read_model_weights(path: str | os.PathLike, prefer_ema: bool = False) -> ModelWeights:
    """Read the checkpoint at ``path`` once: its weights (the EMA set of a training checkpoint when present and
    ``prefer_ema``) and the class count / names a densekit training run recorded in its config.

    Raises:
        CheckpointError: missing, unreadable or tensor-less file (named).
    """
    state = read_checkpoint(path)
    run = state if isinstance(state, dict) else {}  # a bare tensor list / other object: no run record
    overrides = _recorded_model(run)
    if prefer_ema and isinstance(run.get("ema"), dict) and isinstance(run["ema"].get("module"), dict):
        return ModelWeights(run["ema"]["module"], f"EMA weights of {os.fspath(path)}", overrides)
    return ModelWeights(state_dict_from(state, path), f"checkpoint {os.fspath(path)}", overrides)
