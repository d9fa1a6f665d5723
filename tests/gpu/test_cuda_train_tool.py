"""tools/train.py with ``device=`` on the embedded synthetic COCO-format dataset: 2 training steps, then the COCO
evaluation, in a subprocess as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model=efficientdet_d0", "model.neck.repeats=1", "model.neck.channels=16", "model.head.repeats=1",
    "data.num_train=8", "data.num_val=4", "data.image_size=128", "train.max_steps=2", "train.batch_size=4",
    "train.num_workers=0", "train.backbone_weights=none", "train.ema_decay=0.9", "eval.batch_size=4",
]


def test_train_tool_trains_and_evaluates_on_the_device(device: torch.device, tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DENSEKIT_DATASETS": str(tmp_path / "datasets")}
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), *TINY, f"device={device.type}", f"hydra.run.dir={run}"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert f"device {device}" in output  # device=cuda resolves to this process's GPU, cuda:0
    state = torch.load(run / "checkpoints" / "last.pth", weights_only=True, map_location="cpu")
    assert state["step"] == 2
    final = json.loads((run / "metrics.json").read_text())["final"]
    assert 0.0 <= final["AP"] <= 1.0 and len(final["per_class_ap"]) == 5
    assert "AP50" in done.stdout
