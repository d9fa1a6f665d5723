"""Learning-rate schedules as step -> multiplier functions for ``torch.optim.lr_scheduler.LambdaLR``."""
from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(total_steps: int, warmup_steps: int, warmup_factor: float = 0.1, final_factor: float = 0.0) -> Callable[[int], float]:
    """EfficientDet's schedule: linear warm-up from ``warmup_factor`` x lr, then cosine decay to ``final_factor``.

    The official recipe warms up from 0.008 to 0.08 (factor 0.1) over the first epoch.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_factor + (1.0 - warmup_factor) * step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_poly(total_steps: int, warmup_steps: int, power: float = 0.9, warmup_factor: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up then ``(1 - progress) ** power`` (the usual segmentation schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_factor + (1.0 - warmup_factor) * step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return (1.0 - progress) ** power

    return factor
