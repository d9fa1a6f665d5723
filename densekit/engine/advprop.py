"""AdvProp (Xie et al., "Adversarial Examples Improve Image Recognition", CVPR 2020) as a training option.

``train.advprop=true``: for every batch, PGD adversarial examples are made against the current model, the clean
batch goes through the main BatchNorms and the adversarial one through auxiliary BatchNorms
(:mod:`densekit.modeling.dual_bn`), and the two losses are summed. Any model works whose training-mode forward
returns a dict of losses and that has BatchNorms.

The attack (the paper's Sec. 5.1): L-infinity PGD in input-pixel space, i.e. on the images the model receives,
in [0, 1], before the model's own ``pixel_mean`` / ``pixel_std`` normalisation, so that ``epsilon`` means the same
for every model whatever its normalisation. ``epsilon`` and ``step_size`` are given on the 0-255 scale as in the
paper (epsilon 1-4, step size 1, ``epsilon + 1`` attack steps, or 1 step for epsilon 1); the start is a uniform
random point of the epsilon ball (Madry et al.'s PGD). The attacker uses the auxiliary BNs, as the paper's does.

What each set of BN statistics sees: the main BNs only clean batches (one update per step), the auxiliary BNs only
the final adversarial batch (one update per step): the attack's intermediate passes normalise with batch statistics
but leave the running statistics as they were (:func:`~densekit.modeling.dual_bn.frozen_aux_statistics`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..modeling.dual_bn import frozen_aux_statistics, use_aux_bn

LossFn = Callable[[torch.Tensor, list[dict[str, Any]]], dict[str, torch.Tensor]]

#: Prefix of the adversarial batch's loss terms in the step's loss dict (``adv_loss_cls``...).
ADV_PREFIX = "adv_"


class AdvProp:
    """Makes PGD adversarial batches and the summed clean + adversarial losses of a step.

    Args:
        steps: PGD iterations (>= 1).
        epsilon: L-infinity radius on the 0-255 pixel scale (the paper: 1-4).
        step_size: Step per iteration on the 0-255 scale (the paper: 1).
        random_start: Start from a uniform random point of the ball (PGD) rather than from the clean image.

    Raises:
        ValueError: a setting out of range (named as its ``train.advprop_*`` key).
    """

    def __init__(self, steps: int = 1, epsilon: float = 1.0, step_size: float = 1.0, random_start: bool = True) -> None:
        if steps < 1:
            raise ValueError(f"train.advprop_steps must be >= 1, got {steps}")
        if not 0 < epsilon <= 255 or not 0 < step_size <= 255:
            raise ValueError(
                f"train.advprop_epsilon and train.advprop_step_size are on the 0-255 pixel scale and must be in "
                f"(0, 255], got {epsilon} and {step_size} (the paper: epsilon 1-4, step size 1)"
            )
        self.steps = int(steps)
        self.epsilon = float(epsilon) / 255.0
        self.step_size = float(step_size) / 255.0
        self.random_start = random_start

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> AdvProp:
        return cls(cfg.advprop_steps, cfg.advprop_epsilon, cfg.advprop_step_size)

    def attack(self, model: nn.Module, images: torch.Tensor, targets: list[dict[str, Any]]) -> torch.Tensor:
        """PGD adversarial examples of ``images`` (``[B, 3, H, W]`` in [0, 1], or uint8) against ``model``'s
        training loss, through its auxiliary BNs. Parameter gradients are neither computed nor touched."""
        clean = images.float() / 255.0 if images.dtype == torch.uint8 else images.detach()
        low, high = (clean - self.epsilon).clamp(min=0.0), (clean + self.epsilon).clamp(max=1.0)
        adv = clean
        if self.random_start:
            adv = torch.maximum(torch.minimum(clean + torch.empty_like(clean).uniform_(-self.epsilon, self.epsilon), high), low)
        with use_aux_bn(model), frozen_aux_statistics(model):
            for _ in range(self.steps):
                adv = adv.detach().requires_grad_(True)
                loss = sum(model(adv, targets).values())
                (grad,) = torch.autograd.grad(loss, adv)
                adv = torch.maximum(torch.minimum(adv.detach() + self.step_size * grad.sign(), high), low)
        return adv.detach()

    def losses(
        self, model: nn.Module, forward: LossFn, images: torch.Tensor, targets: list[dict[str, Any]]
    ) -> dict[str, torch.Tensor]:
        """The clean losses (``forward``: the model, or its DDP wrapper) and the adversarial ones (prefixed
        ``adv_``), whose sum is the step's loss. The attack runs first, so that the clean graph is not held in
        memory while it does."""
        adv_images = self.attack(model, images, targets)
        clean = forward(images, targets)
        with use_aux_bn(model):
            adversarial = model(adv_images, targets)
        return {**clean, **{ADV_PREFIX + key: value for key, value in adversarial.items()}}
