"""tools/quantize.py end to end on the embedded synthetic dataset: calibrate, score fp32 and int8, time, save."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao", reason="int8 needs torchao (pip install torchao)")

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = ["model=efficientdet_d0", "model.neck.repeats=1", "model.neck.channels=16", "model.head.repeats=1"]


def test_quantize_tool_scores_both_precisions_and_saves_a_loadable_program(tmp_path: Path) -> None:
    datasets, run = tmp_path / "datasets", tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "tools" / "quantize.py"), *TINY_MODEL, "data.num_train=4", "data.num_val=2", "data.image_size=128",
               "eval.allow_random_weights=true", "eval.batch_size=2", "quantize.calibration_images=2",
               "quantize.compile=false", "quantize.warmup=1", "quantize.iters=2", f"hydra.run.dir={run}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DENSEKIT_DATASETS": str(datasets), "OMP_NUM_THREADS": "2"}
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((run / "quantize.json").read_text())
    assert record["calibration_images"] == 2 and record["input"] == [1, 3, 128, 128]
    for name in ("fp32", "int8"):
        assert 0.0 <= record["metrics"][name]["AP"] <= 1.0
        assert record["timing"][name]["median_ms"] > 0
        assert (run / name / "detections_val.json").exists()
    assert "int8 / fp32 latency" in done.stdout and "AP" in done.stdout
    program = torch.export.load(run / "int8_network.pt2").module()
    with torch.no_grad():
        cls_out, box_out = program(torch.rand(1, 3, 128, 128))
    assert len(cls_out) == len(box_out) == 5
