"""Two CPU processes under torchrun (gloo): training runs, losses stay finite, weights stay identical."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_two_process_gloo_training_keeps_ranks_identical(tmp_path: Path) -> None:
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", str(worker), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RANKS_MAX_WEIGHT_DIFF 0.0" in proc.stdout
    assert (tmp_path / "checkpoints" / "last.pth").is_file()  # written once, by rank 0
