"""Exponential moving average of model weights, the weights EfficientDet is evaluated with."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """Keeps ``ema = decay * ema + (1 - decay) * model`` for every floating-point tensor of the state (weights and
    BN statistics, as timm's ModelEmaV2 that effdet trains with); integer buffers are copied.

    The decay ramps up as ``min(decay, (1 + step) / (10 + step))`` so that a fresh run is not dominated by its random
    initial weights for thousands of steps (0.9998 has a horizon of ~5000 steps).

    Args:
        model: The trained model (unwrapped from DDP).
        decay: Target decay (EfficientDet: 0.9998).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        floats, values, integers, counts = [], [], [], []
        # The tensors are looked up on every call (~1.5 ms): a cached list would go stale silently if anything
        # replaced a parameter's storage (Module.to with another dtype or memory format does).
        for target, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            pair = (floats, values) if value.dtype.is_floating_point else (integers, counts)
            pair[0].append(target)
            pair[1].append(value)
        # One fused lerp over all tensors (ema + (1 - d) * (value - ema)) instead of a Python loop of mul_/add_ over
        # ~700 tensors, and exact for tensors that did not change (frozen layers).
        if floats:
            torch._foreach_lerp_(floats, values, 1 - d)
        if integers:
            torch._foreach_copy_(integers, counts)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
