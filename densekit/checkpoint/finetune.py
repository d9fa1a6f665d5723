"""Fine-tuning from a checkpoint of another class count: everything that fits loads, the class predictor starts over.

The most common workflow of a detection toolkit is to start a model for one's own classes from the COCO weights.
The tensors whose rows are classes (:meth:`DenseModel.class_predictor`: EfficientDet's class-net output conv,
ESeg's classifier, LR-ASPP's two classifiers) cannot keep their shape; they keep the model's fresh initialisation
(the prior-probability bias of training from scratch), except for the rows of classes whose names the checkpoint
shares with the new dataset (a "person, car, dog" dataset starts from COCO's person / car / dog rows). Every other
tensor must fit exactly, all-or-nothing as any other load: a backbone of another width is still refused, naming
its keys.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..labels import COCO_ID_HEAD, class_names_of, default_class_names
from .convert import load_state_dict_any, to_model_layout
from .io import CheckpointError, load_state_dict_checked
from .weights import ModelWeights

log = logging.getLogger(__name__)


@dataclass
class FinetuneReport:
    """What :func:`load_for_finetuning` did.

    Attributes:
        reinitialised: Class-predictor keys that kept the model's initialisation (empty: the class counts matched).
        kept_classes: ``{new label: checkpoint label}`` of the classes whose rows were copied (matching names).
        checkpoint_classes: Class count of the checkpoint's predictor (None when it has none, e.g. backbone only).
    """

    reinitialised: list[str] = field(default_factory=list)
    kept_classes: dict[int, int] = field(default_factory=dict)
    checkpoint_classes: int | None = None


def _normalise(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def match_classes(new_names: Sequence[str] | None, old_names: Sequence[str] | None) -> dict[int, int]:
    """``{new label: old label}`` for the new classes whose name (case, ``_`` and spacing aside) is an old one's."""
    if not old_names or not new_names:
        return {}
    old_index = {_normalise(name): i for i, name in reversed(list(enumerate(old_names)))}
    return {i: old_index[_normalise(name)] for i, name in enumerate(new_names) if _normalise(name) in old_index}


def _class_count(tensor: torch.Tensor, rows_per_class: int, key: str) -> int:
    if tensor.shape[0] % rows_per_class:
        raise CheckpointError(f"{key}: {tensor.shape[0]} rows are not a multiple of {rows_per_class} per class")
    return tensor.shape[0] // rows_per_class


def _copy_rows(fresh: torch.Tensor, old: torch.Tensor, rows_per_class: int, kept: dict[int, int]) -> torch.Tensor:
    """``fresh`` with the kept classes' rows taken from ``old``; rows are anchor-major (``a * C + c``)."""
    out = fresh.clone()
    new_c, old_c = fresh.shape[0] // rows_per_class, old.shape[0] // rows_per_class
    for anchor in range(rows_per_class):
        for new_label, old_label in kept.items():
            out[anchor * new_c + new_label] = old[anchor * old_c + old_label]
    return out


def _recorded_names(model: nn.Module) -> list[str] | None:
    config = getattr(model, "config", None)
    return None if config is None else config.get("class_names")


def _known_names(num_classes: int, recorded: Sequence[str] | None) -> list[str] | None:
    """Real class names only (recorded ones, or COCO's for a 90-class head): placeholder names never match."""
    if recorded:
        return list(recorded)
    return default_class_names(num_classes) if num_classes == COCO_ID_HEAD else None


def _checkpoint_class_count(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> int | None:
    """Class count of the checkpoint's class predictor (None when it has none of the model's predictor keys)."""
    present = {key: rows for key, rows in model.class_predictor().items() if key in state_dict}
    counts = {_class_count(state_dict[key], rows, key) for key, rows in present.items()}
    if len(counts) > 1:
        raise CheckpointError(f"{source}: its class-predictor tensors disagree on the class count ({sorted(counts)})")
    return counts.pop() if counts else None


def _replace_predictor(
    model: nn.Module, state_dict: dict[str, torch.Tensor], old_names: Sequence[str] | None
) -> tuple[list[str], dict[int, int]]:
    """Swap the checkpoint's class-predictor tensors in ``state_dict`` (in place) for the model's fresh ones,
    with the rows of classes named in both copied over. Returns the swapped keys and ``{new: old}`` labels kept."""
    own = model.state_dict()
    present = {key: rows for key, rows in model.class_predictor().items() if key in state_dict}
    if any(state_dict[key].shape[1:] != own[key].shape[1:] for key in present):
        # Another architecture (e.g. a wider head): leave it to the checked load, which lists every bad key.
        return [], {}
    kept = match_classes(_known_names(model.num_classes, _recorded_names(model)), old_names)
    for key, rows in present.items():
        state_dict[key] = _copy_rows(own[key], state_dict[key], rows, kept)
    return sorted(present), kept


def load_for_finetuning(model: nn.Module, weights: ModelWeights) -> FinetuneReport:
    """Load ``weights`` into ``model`` for training, whatever the two class counts (see the module docstring).

    The checkpoint's class names are those it records (a densekit run, a zoo entry) or, for a 90-class head,
    COCO's. One log line names the re-initialised tensors and the classes kept.

    Raises:
        CheckpointError: anything other than the class predictor does not fit (nothing is loaded then).
    """
    converted = to_model_layout(model, weights.state_dict, weights.source)
    if converted is None:  # backbone-only weights: nothing class-specific in them
        load_state_dict_any(model, weights.state_dict, weights.source)
        return FinetuneReport()
    state_dict, source = dict(converted[0]), converted[1]
    old_count = _checkpoint_class_count(model, state_dict, source)
    report = FinetuneReport(checkpoint_classes=old_count)
    if old_count is not None and old_count != model.num_classes:
        old_names = _known_names(old_count, weights.class_names)
        if old_names is not None and len(old_names) != old_count:
            raise CheckpointError(f"{source} records {len(old_names)} class names for its {old_count} classes")
        report.reinitialised, report.kept_classes = _replace_predictor(model, state_dict, old_names)
    load_state_dict_checked(model, state_dict, source)
    if report.reinitialised:
        names = class_names_of(model.config) if model.config is not None else []
        kept = ", ".join(names[new] for new in sorted(report.kept_classes)) if names else ""
        log.info(
            "fine-tuning from %s: %d -> %d classes; re-initialised %s; kept the rows of %d classes with matching "
            "names%s; every other tensor loaded",
            source, old_count, model.num_classes, ", ".join(report.reinitialised),
            len(report.kept_classes), f" ({kept})" if kept else "",
        )
    return report
