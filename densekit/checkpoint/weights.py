"""What a ``weights=`` argument names, read once: the tensors, where they came from, and what is known about the
model they belong to (class count and class names of a densekit training run, or a zoo entry's model config keys)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from . import zoo
from .io import read_checkpoint, state_dict_from


@dataclass
class ModelWeights:
    """The tensors of a ``weights=`` file and what it says about its model.

    Attributes:
        state_dict: Flat tensors, in the file's own layout (converted on load by ``load_state_dict_any``).
        source: Human-readable origin for messages, e.g. ``"EMA weights of run/checkpoints/last.pth"``.
        model_overrides: Model config keys (nested) the weights need: those a densekit run recorded
            (``num_classes``, ``class_names``), or a zoo entry's (its classes, plus for some entries backbone /
            padding / normalisation keys, see :meth:`~densekit.checkpoint.zoo.ZooEntry.model_overrides`); empty for
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

    ``path`` may name a zoo entry, ``"zoo:<name>"`` (:mod:`densekit.checkpoint.zoo`): its file is downloaded into
    the cache on first use, and ``model_overrides`` are the entry's.

    Raises:
        CheckpointError: missing, unreadable or tensor-less file (named); unknown zoo name, failed download or
            wrong hash (naming the URL and where to put the file by hand).
    """
    if zoo.is_zoo_ref(path):
        entry = zoo.get_entry(path)
        file = zoo.fetch(entry)
        source = f"{zoo.ZOO_PREFIX}{entry.name} ({file}, for model={entry.model})"
        return ModelWeights(state_dict_from(read_checkpoint(file), file), source, entry.model_overrides())
    state = read_checkpoint(path)
    run = state if isinstance(state, dict) else {}  # a bare tensor list / other object: no run record
    overrides = _recorded_model(run)
    if prefer_ema and isinstance(run.get("ema"), dict) and isinstance(run["ema"].get("module"), dict):
        return ModelWeights(run["ema"]["module"], f"EMA weights of {os.fspath(path)}", overrides)
    return ModelWeights(state_dict_from(state, path), f"checkpoint {os.fspath(path)}", overrides)
