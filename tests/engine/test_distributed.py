"""Two CPU processes under torchrun (gloo): training runs, losses stay finite, weights stay identical."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def test_two_process_gloo_training_keeps_ranks_identical(tmp_path: Path) -> None:
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", str(worker), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RANKS_MAX_WEIGHT_DIFF 0.0" in proc.stdout
    assert "RANK_DONE 0" in proc.stdout and "RANK_DONE 1" in proc.stdout  # both left the process group cleanly
    assert (tmp_path / "checkpoints" / "last.pth").is_file()  # written once, by rank 0


def test_sync_bn_conversion_keeps_what_the_model_computes(tiny_model, randomise) -> None:
    """train.sync_bn's conversion: every BatchNorm becomes a SyncBatchNorm and, in eval mode, the model computes
    exactly what it did. timm's BatchNormAct2d (BN + activation) must keep its activation: torch's own converter
    drops it (measured: outputs off by ~800 on this model)."""
    import copy

    from torch import nn

    from densekit.engine.distributed import convert_sync_batchnorm

    model = tiny_model.eval()
    randomise(model)
    assert any(type(m).__name__ == "BatchNormAct2d" for m in model.modules())
    converted = convert_sync_batchnorm(copy.deepcopy(model)).eval()
    norms = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for got, expected in zip(converted.forward_raw(x)[0], model.forward_raw(x)[0]):
            assert torch.equal(got, expected)
