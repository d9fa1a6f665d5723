"""Running a model over a loader for evaluation, with progress and optional mixed precision."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm


class Evaluator(Protocol):
    def update(self, outputs: list[dict[str, torch.Tensor]], targets: list[dict[str, Any]]) -> None: ...

    def evaluate(self) -> dict[str, Any]: ...


@torch.inference_mode()
def run_inference(
    model: nn.Module,
    loader: Iterable,
    evaluator: Evaluator,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    desc: str = "eval",
) -> dict[str, Any]:
    """Feed every batch through ``model`` in eval mode and return ``evaluator.evaluate()``."""
    was_training = model.training
    model.eval()
    for images, targets in tqdm(loader, desc=desc, dynamic_ncols=True, leave=False):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images.to(device, non_blocking=True))
        outputs = [{k: v.float() if v.is_floating_point() else v for k, v in o.items()} for o in outputs]
        evaluator.update(outputs, targets)
    model.train(was_training)
    return evaluator.evaluate()
