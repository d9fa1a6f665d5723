"""Gradient checkpointing (``model.grad_checkpoint``): trade compute for memory in training.

Backbone stages and BiFPN layers keep only their inputs in the forward pass and recompute their activations in the
backward pass (``torch.utils.checkpoint``, non-reentrant), as automl's EfficientDet does for D6-D7x. One detail the
usual recipe gets wrong: a recomputed BatchNorm in training mode updates its running statistics a second time
(every step would count twice, with the same batch). :func:`guard_batchnorm_statistics` restores them after a
recomputation, so a checkpointed run ends with exactly the statistics of a plain one. For that a recomputation must
run to its end: torch stops it early by default (once the tensors backward needs exist, possibly between a
BatchNorm's update and its forward hook), so checkpointed code runs under :func:`full_recomputation`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ContextManager

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = ["checkpointed", "full_recomputation", "guard_batchnorm_statistics", "in_recomputation"]

_SAVED_ATTR = "_densekit_bn_stats_before_recompute"


def full_recomputation() -> ContextManager[None]:
    """Checkpoints created inside recompute their whole function (no early stop): see the module's docstring."""
    return torch.utils.checkpoint.set_checkpoint_early_stop(False)


def checkpointed(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` whose activations are recomputed in the backward pass instead of kept."""
    with full_recomputation():
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def in_recomputation() -> bool:
    """Whether this forward is a checkpoint's recomputation (any caller's: timm's stages too).

    torch.utils.checkpoint (non-reentrant) recomputes under saved-tensor hooks of its own ``_recomputation_hook``;
    torch has no public flag for it (and the backward's graph-task id is not set there), so the hooks on top of
    the stack are asked. Should a future torch rename them, this says False: statistics then update twice, as
    they do in every other codebase, and tests/modeling/test_grad_checkpoint.py fails to say so.
    """
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError, RuntimeError):
        return False
    return bool(hooks) and getattr(hooks[0], "__qualname__", "").startswith("_recomputation_hook.")


def _save_stats(module: nn.modules.batchnorm._BatchNorm, args: Any) -> None:
    if module.training and module.track_running_stats and in_recomputation():
        buffers = (module.running_mean, module.running_var, module.num_batches_tracked)
        setattr(module, _SAVED_ATTR, tuple(b.clone() for b in buffers))


def _restore_stats(module: nn.modules.batchnorm._BatchNorm, args: Any, output: Any) -> None:
    saved = module.__dict__.pop(_SAVED_ATTR, None)
    if saved is not None:
        for buffer, value in zip((module.running_mean, module.running_var, module.num_batches_tracked), saved):
            buffer.copy_(value)


def guard_batchnorm_statistics(module: nn.Module) -> int:
    """Make every BatchNorm in ``module`` leave its running statistics unchanged when it is recomputed in a
    backward pass; returns how many BatchNorms it guards (idempotent: guarded ones are not counted again).

    Module hooks, not wrappers: ``state_dict`` keys stay as they are, and ``copy.deepcopy`` (the EMA copy) keeps them.
    """
    count = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not getattr(m, "_densekit_bn_guarded", False):
            m.register_forward_pre_hook(_save_stats)
            m.register_forward_hook(_restore_stats)
            m._densekit_bn_guarded = True
            count += 1
    return count
