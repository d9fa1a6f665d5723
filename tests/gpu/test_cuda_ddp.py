"""A 1-process DistributedDataParallel run through the Trainer: nccl with SyncBatchNorm on CUDA (gloo, where
SyncBatchNorm does not run and train.sync_bn is ignored with a warning, in the CPU dry run). One GPU holds one
NCCL rank, so one process is what one device can check: the group, the DDP wrapper, SyncBN's conversion and the
collectives the trainer and its hooks issue."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gpu_support import Scale, training_batch
from densekit.config import TrainConfig
from densekit.engine import distributed as dist_utils
from densekit.engine.trainer import Trainer


@pytest.fixture
def process_group(device: torch.device, tmp_path: Path):
    """A 1-process group on the device's backend (a file store: no port to collide with), torn down after."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def test_ddp_with_sync_bn_trains(
    process_group: str, device: torch.device, scale: Scale, make_model: Callable[[str], nn.Module], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    batch = training_batch("detector", scale)
    cfg = TrainConfig(
        batch_size=scale.batch, max_steps=2, lr=0.01, warmup_epochs=0.0, ema_decay=0.9, num_workers=0,
        checkpoint_every=100, sync_bn=True,
    )
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(make_model("detector"), [batch], cfg, tmp_path, device)
    assert dist.get_backend() == process_group and trainer.world_size == 1
    assert isinstance(trainer.ddp, DistributedDataParallel)
    sync_bns = [m for m in trainer.model.modules() if isinstance(m, nn.SyncBatchNorm)]
    if device.type == "cuda":
        # Every BN synchronised, timm's BN + activation modules as SyncBatchNormAct (their activation kept).
        assert any(type(m).__name__ == "SyncBatchNormAct" for m in sync_bns)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in trainer.model.modules())
    else:
        assert not sync_bns and "train.sync_bn ignored" in caplog.text
    trainer.train()
    assert trainer.step == 2 and dist_utils.all_finite(trainer.loss)  # an all_reduce on the device's backend
    assert all(p.device == device for p in trainer.model.parameters())
    assert (tmp_path / "checkpoints" / "last.pth").is_file()
