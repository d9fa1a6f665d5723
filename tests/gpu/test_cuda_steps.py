"""Training steps on the device through the Trainer's own step (autocast, GradScaler, clipping, optimiser): a
detector and a segmenter, in fp32, fp16 (loss scaling) and bf16."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from gpu_support import Scale, training_batch
from densekit.config import TrainConfig
from densekit.engine.trainer import Trainer

AMP_DTYPES = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def first_conv_dtype(model: nn.Module) -> Callable[[], torch.dtype | None]:
    """Hooks the model's first convolution; the returned function gives its last output's dtype (the autocast
    dtype it really ran in)."""
    seen: dict[str, torch.dtype] = {}
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda mod, args, out: seen.__setitem__("dtype", out.dtype))
    return lambda: seen.get("dtype")


@pytest.mark.parametrize("amp", ["none", "fp16", "bf16"])
@pytest.mark.parametrize("kind", ["detector", "segmenter"])
def test_training_step_on_the_device(
    kind: str, amp: str, device: torch.device, scale: Scale, make_model: Callable[[str], nn.Module], tmp_path: Path
) -> None:
    """Each step: finite losses, the convolutions in the autocast dtype, weights and gradients on the device and
    finite. fp32 and bf16 move the weights at the first step. fp16 may skip steps while GradScaler finds overflows
    (it starts at a scale of 2**16), and each skipped step must lower the scale; on CUDA a real step must come
    within ``scale.steps``, on the CPU (slow fp16 convolutions) the dry run stops after ``scale.steps``."""
    model = make_model(kind)
    conv_dtype = first_conv_dtype(model)
    batch = training_batch(kind, scale)
    cfg = TrainConfig(
        batch_size=scale.batch, max_steps=scale.steps, lr=0.01, warmup_epochs=0.0, ema_decay=0.0, amp=amp,
        num_workers=0, clip_grad_norm=10.0,
    )
    trainer = Trainer(model, [batch], cfg, tmp_path, device, hooks=[])
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    stepped = False
    for _ in range(scale.steps if amp == "fp16" else 1):
        before = {k: v.clone() for k, v in trainer.model.named_parameters()}
        scale_before = trainer.scaler.get_scale() if amp == "fp16" else None
        trainer.run_step(*batch)
        assert all(math.isfinite(float(v)) for v in trainer.losses.values()), trainer.losses
        assert conv_dtype() == AMP_DTYPES[amp]
        stepped = any(not torch.equal(p, before[k]) for k, p in trainer.model.named_parameters())
        if stepped:
            break
        assert amp == "fp16" and trainer.scaler.get_scale() < scale_before, "a step was skipped without an overflow"
    assert stepped or device.type == "cpu", f"no optimiser step in {scale.steps} fp16 steps"
    for name, p in trainer.model.named_parameters():
        assert p.device == device and p.dtype == torch.float32, name  # master weights stay fp32 under autocast
        # Gradients of a step GradScaler skipped hold the overflow; a step taken had finite ones.
        assert not stepped or p.grad is None or torch.isfinite(p.grad).all(), name
