"""Auxiliary BatchNorms for AdvProp (Xie et al., "Adversarial Examples Improve Image Recognition", CVPR 2020).

AdvProp trains on clean and adversarial images with one set of weights but two sets of BatchNorm statistics, since
the two distributions differ: the clean images go through the main BNs, the adversarial ones through auxiliary
twins. At test time only the main BNs are used, and the auxiliary ones are dropped.

:func:`convert_to_dual_bn` wraps every BatchNorm of a model in a :class:`DualBatchNorm2d`; :func:`use_aux_bn` routes
all of them to their auxiliary twin for the duration of a ``with`` block. A wrapped model's ``state_dict`` keeps the
main BN tensors under their original keys (``...bn1.weight``) and adds the twins under ``...bn1.aux.*``, so

* an AdvProp training checkpoint keeps both sets (and resumes with both);
* a model without AdvProp loads the main set of such a checkpoint once :func:`strip_aux_bn_keys` has removed the
  ``aux`` keys (``load_weights`` / ``tools/eval.py`` / ``tools/export.py`` do this);
* :func:`unwrap_dual_bn` turns a wrapped model back into a plain one holding the main BNs (BN folding does this).
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

AUX = "aux"
_MAIN = "main"


class DualBatchNorm2d(nn.Module):
    """A BatchNorm (any ``_BatchNorm``: ``nn.BatchNorm2d``, timm's ``BatchNormAct2d``, ``SyncBatchNorm``) with an
    auxiliary twin for adversarial inputs.

    ``main`` is the original module, ``aux`` a copy of it made at wrapping time (same weights and statistics, then
    trained on adversarial batches only). ``forward`` uses ``main`` unless ``route_aux`` is set, which
    :func:`use_aux_bn` does for a whole model.

    State-dict keys: ``main``'s tensors appear without the ``main.`` level (exactly the unwrapped BN's keys), the
    twin's under ``aux.``.
    """

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        if not isinstance(bn, _BatchNorm):
            raise TypeError(f"DualBatchNorm2d wraps a BatchNorm, got {type(bn).__name__}")
        self.main = bn
        self.aux = copy.deepcopy(bn)
        self.route_aux = False
        self._main_keys = tuple(bn.state_dict())
        self.register_state_dict_post_hook(_flatten_main_keys)
        self.register_load_state_dict_pre_hook(_nest_main_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aux(x) if self.route_aux else self.main(x)

    def extra_repr(self) -> str:
        return f"route_aux={self.route_aux}"


def _flatten_main_keys(module: DualBatchNorm2d, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``prefix.main.weight`` -> ``prefix.weight``: a wrapped BN saves its main tensors under the plain BN's keys."""
    for key in module._main_keys:
        nested = f"{prefix}{_MAIN}.{key}"
        if nested in state_dict:
            state_dict[prefix + key] = state_dict.pop(nested)


def _nest_main_keys(module: DualBatchNorm2d, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """The inverse of :func:`_flatten_main_keys`, before ``load_state_dict`` matches keys to tensors."""
    for key in module._main_keys:
        if prefix + key in state_dict:
            state_dict[f"{prefix}{_MAIN}.{key}"] = state_dict.pop(prefix + key)


def dual_bns(model: nn.Module) -> list[DualBatchNorm2d]:
    """Every :class:`DualBatchNorm2d` of ``model``."""
    return [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]


def convert_to_dual_bn(model: nn.Module) -> int:
    """Wrap, in place, every BatchNorm of ``model`` in a :class:`DualBatchNorm2d`; returns how many were wrapped.

    BNs already wrapped stay as they are, so converting twice is harmless. Must run before the optimiser is built
    (the twins' parameters are new) and before an EMA copy is taken (so that it carries both sets too).

    Raises:
        ValueError: ``model`` has no BatchNorm, so AdvProp's auxiliary BNs cannot exist.
    """
    wrapped = 0
    for parent in list(model.modules()):
        if isinstance(parent, DualBatchNorm2d):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm):
                setattr(parent, name, DualBatchNorm2d(child))
                wrapped += 1
    if not wrapped and not dual_bns(model):
        raise ValueError(f"{type(model).__name__} has no BatchNorm layers: AdvProp needs BNs to give auxiliary twins")
    return wrapped


def unwrap_dual_bn(model: nn.Module) -> int:
    """Replace, in place, every :class:`DualBatchNorm2d` by its main BN (the inference model); returns how many."""
    unwrapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DualBatchNorm2d):
                setattr(parent, name, child.main)
                unwrapped += 1
    return unwrapped


@contextmanager
def use_aux_bn(model: nn.Module) -> Iterator[None]:
    """Within the block, every :class:`DualBatchNorm2d` of ``model`` normalises with its auxiliary twin."""
    bns = dual_bns(model)
    if not bns:
        raise ValueError("use_aux_bn: the model has no auxiliary BatchNorms; call convert_to_dual_bn(model) first")
    for bn in bns:
        bn.route_aux = True
    try:
        yield
    finally:
        for bn in bns:
            bn.route_aux = False


@contextmanager
def frozen_aux_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block the auxiliary BNs still normalise with batch statistics (training mode) but their running
    statistics are restored afterwards: PGD's intermediate attack passes must not count as adversarial batches."""
    saved = [{name: buf.clone() for name, buf in bn.aux.named_buffers()} for bn in dual_bns(model)]
    try:
        yield
    finally:
        with torch.no_grad():
            for bn, buffers in zip(dual_bns(model), saved):
                for name, buf in bn.aux.named_buffers():
                    buf.copy_(buffers[name])


def main_bn_key(key: str) -> str | None:
    """The main-BN key of an auxiliary-BN key (``...bn1.aux.running_mean`` -> ``...bn1.running_mean``), else None."""
    head, sep, tail = key.rpartition(f".{AUX}.")
    return f"{head}.{tail}" if sep else None


def strip_aux_bn_keys(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state_dict`` without its auxiliary-BN tensors when ``model`` has none (a plain model loading an AdvProp
    checkpoint: evaluation and export use the main BNs only); unchanged for a model with auxiliary BNs.

    Only keys whose main twin (the key without its ``aux.`` level) is a key of ``model`` are dropped, so a genuine
    module called ``aux`` is never mistaken for one. Returns the filtered dict and the dropped keys.
    """
    if dual_bns(model):
        return dict(state_dict), []
    own = model.state_dict()
    kept: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        if key not in own and main_bn_key(key) in own:
            dropped.append(key)
        else:
            kept[key] = value
    return kept, dropped
