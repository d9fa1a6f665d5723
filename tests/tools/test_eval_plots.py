"""eval.plots end to end: a 2-step training run ends with plots/ (the final evaluation's and training.png), and
``tools/eval.py`` on its checkpoint writes plots/ beside metrics.json; both name the folder and the best-F1 threshold
in their summary."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=efficientdet_d0", "model.neck.repeats=1", "model.neck.channels=16", "model.head.repeats=1",
        "data.num_train=8", "data.num_val=4", "data.image_size=128"]
DETECTION_PLOTS = {"pr_curve.png", "threshold_curves.png", "confusion_matrix.png", "per_class_ap.png",
                   "error_breakdown.png"}


def _run(tool: str, *overrides: str, datasets: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DENSEKIT_DATASETS": str(datasets), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / tool), *TINY, *overrides], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _pngs(folder: Path) -> set[str]:
    for path in folder.glob("*.png"):
        with Image.open(path) as image:
            image.verify()
    return {p.name for p in folder.glob("*.png")}


def test_training_and_eval_write_plots(tmp_path: Path) -> None:
    datasets, run, evaluated = tmp_path / "datasets", tmp_path / "run", tmp_path / "eval"
    out = _run("train.py", "train.max_steps=2", "train.batch_size=4", "train.num_workers=0",
               "train.backbone_weights=none", "train.freeze_at=0", f"hydra.run.dir={run}", datasets=datasets)
    assert _pngs(run / "plots") == DETECTION_PLOTS | {"training.png"}
    final = json.loads((run / "metrics.json").read_text())["final"]
    assert final["plots"]["dir"] == str(run / "plots")
    threshold = final["plots"]["best_f1_threshold"]
    assert f"plots: {run / 'plots'}" in out and f"predict.score_threshold={threshold:g}" in out

    out = _run("eval.py", f"weights={run / 'checkpoints' / 'last.pth'}", "eval.num_workers=0",
               f"hydra.run.dir={evaluated}", datasets=datasets)
    assert _pngs(evaluated / "plots") == DETECTION_PLOTS
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert set(metrics["plots"]["error_breakdown"]) == {"C75", "C50", "Loc", "Sim", "Oth", "BG", "FN"}
    assert metrics["plots"]["error_breakdown"]["C50"] == pytest.approx(metrics["AP50"], abs=1e-6)
    assert "COCO error breakdown" in out and f"plots: {evaluated / 'plots'}" in out
    assert json.loads((evaluated / "plots" / "plots.json").read_text())["confusion_matrix"]["iou"] == 0.5
