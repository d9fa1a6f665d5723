"""tools/train.py and tools/eval.py end to end on tiny synthetic data: a killed run resumes, eval writes COCO files."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = ["model=efficientdet_d0", "model.neck.repeats=1", "model.neck.channels=16", "model.head.repeats=1"]
TINY_DATA = ["data.num_train=24", "data.num_val=6", "data.image_size=128", "eval.plots=false"]  # plots: test_eval_plots


def tool(name: str, *overrides: str, datasets: Path) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / name), *overrides]


def env_for(datasets: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "DENSEKIT_DATASETS": str(datasets), "OMP_NUM_THREADS": "2"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """Train 8 steps, SIGKILL the run after its first checkpoint, restart it; returns (run dir, datasets dir).

    Progressive learning in two stages (epoch 0 at 64 px, epoch 1 at 128; 6 steps an epoch): the restarted run
    resumes in the first stage and moves on to the second."""
    base = tmp_path_factory.mktemp("tools")
    datasets, run = base / "datasets", base / "run"
    cmd = tool(
        "train.py", *TINY_MODEL, *TINY_DATA, "train.max_steps=8", "train.batch_size=4", "train.checkpoint_every=2",
        "train.num_workers=0", "train.backbone_weights=none", "train.ema_decay=0.9", "train.progressive_stages=2",
        f"hydra.run.dir={run}", datasets=datasets,
    )
    last = run / "checkpoints" / "last.pth"
    proc = subprocess.Popen(cmd, env=env_for(datasets), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists(), proc.stderr.read()[-2000:]
    killed_at = torch.load(last, weights_only=True)["step"]
    assert killed_at < 8

    done = subprocess.run(cmd, env=env_for(datasets), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {last} at step {killed_at} / 8" in done.stdout + done.stderr
    assert "stage 1 / 2 from epoch 0 (64 px, scale jitter" in done.stderr + done.stdout
    assert "stage 2 / 2 from epoch 1 (128 px, scale jitter" in done.stderr + done.stdout
    assert "AP50" in done.stdout and f"run directory: {run}" in done.stdout
    # The recipe's freeze_at=2 on a backbone_weights=none backbone: frozen random layers never learn; say so.
    assert "train.freeze_at=2 freezes randomly initialised backbone layers" in done.stderr + done.stdout
    return run, datasets


def test_killed_training_resumes_and_finishes_planned_steps(trained_run) -> None:
    run, _ = trained_run
    state = torch.load(run / "checkpoints" / "last.pth", weights_only=True)
    assert state["step"] == 8 and state["total_steps"] == 8
    assert not list((run / "checkpoints").glob("*.tmp"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"AP", "AP50", "per_class_ap"} <= set(metrics["final"])
    assert len(metrics["final"]["per_class_ap"]) == 5
    results = json.loads((run / "detections_val.json").read_text())
    assert all(r["category_id"] in {3, 7, 12, 25, 40} for r in results)  # original, non-contiguous ids
    assert list((run / "tensorboard").iterdir())


def test_eval_tool_scores_a_training_checkpoint_and_draws_pictures(trained_run, tmp_path: Path) -> None:
    run, datasets = trained_run
    cmd = tool("eval.py", *TINY_MODEL, *TINY_DATA, f"weights={run / 'checkpoints' / 'last.pth'}", "eval.visualize=2",
               "eval.num_workers=0", f"hydra.run.dir={tmp_path}", datasets=datasets)
    done = subprocess.run(cmd, env=env_for(datasets), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["split"] == "val" and 0.0 <= metrics["AP"] <= 1.0
    assert "Per-class AP" in done.stdout
    assert len(list((tmp_path / "vis").glob("*.jpg"))) == 2
    assert "EMA weights" in done.stdout + done.stderr


def test_eval_tool_writes_a_test_dev_submission_pycocotools_can_load(trained_run, tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    run, datasets = trained_run
    # A COCO-layout dataset with an image-info file (no annotations), like test-dev2017.
    val = json.loads((datasets / "synthetic_shapes" / "annotations" / "instances_val.json").read_text())
    coco = tmp_path / "datasets" / "coco"
    (coco / "test2017").mkdir(parents=True)
    (coco / "annotations").mkdir()
    for img in val["images"]:
        shutil.copy(datasets / "synthetic_shapes" / "val" / img["file_name"], coco / "test2017" / img["file_name"])
    info = coco / "annotations" / "image_info_test-dev2017.json"
    info.write_text(json.dumps({"images": val["images"], "categories": val["categories"]}))

    out = tmp_path / "out"
    cmd = tool("eval.py", *TINY_MODEL, "data=coco", "data.split=test-dev", "data.image_size=128",
               f"weights={run / 'checkpoints' / 'last.pth'}", "eval.num_workers=0", f"hydra.run.dir={out}", datasets=tmp_path / "datasets")
    done = subprocess.run(cmd, env=env_for(tmp_path / "datasets"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = out / "detections_test-dev2017_efficientdet-d0_results.json"
    assert result.is_file() and (out / "detections_test-dev2017_efficientdet-d0_results.zip").is_file()
    loaded = COCO(str(info)).loadRes(str(result))
    assert len(loaded.getAnnIds()) > 0
    assert set(loaded.getCatIds()) <= {3, 7, 12, 25, 40}


def test_bad_config_key_and_missing_dataset_give_clear_errors(tmp_path: Path) -> None:
    done = subprocess.run(tool("train.py", "train.lerning_rate=1", f"hydra.run.dir={tmp_path / 'a'}", datasets=tmp_path), env=env_for(tmp_path), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "lerning_rate" in done.stderr
    done = subprocess.run(tool("eval.py", "data=coco", "eval.allow_random_weights=true", f"hydra.run.dir={tmp_path / 'b'}", datasets=tmp_path / "nowhere"),
                          env=env_for(tmp_path / "nowhere"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "nowhere" in done.stderr and "Traceback" not in done.stderr[-300:]


def test_segmentation_trains_and_evaluates_on_synthetic_cityscapes(tmp_path: Path) -> None:
    run, evald = tmp_path / "run", tmp_path / "eval"
    common = ["model=lraspp_mobilenet_v3_small", "data=synthetic_cityscapes", "data.num_train=8", "data.num_val=4"]
    cmd = tool("train.py", *common, "train=seg_synthetic", "train.max_steps=4", "train.batch_size=4",
               "train.num_workers=0", "train.eval_every_epochs=0", f"hydra.run.dir={run}", datasets=tmp_path)
    done = subprocess.run(cmd, env=env_for(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mIoU" in done.stdout and "Per-class IoU" in done.stdout
    assert torch.load(run / "checkpoints" / "last.pth", weights_only=True)["step"] == 4

    cmd = tool("eval.py", *common, f"weights={run / 'checkpoints' / 'last.pth'}", "data.write_predictions=true",
               "eval.visualize=2", "eval.num_workers=0", f"hydra.run.dir={evald}", datasets=tmp_path)
    done = subprocess.run(cmd, env=env_for(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((evald / "metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0 and len(metrics["per_class_iou"]) == 19
    pngs = sorted((evald / "pred_val").glob("*_leftImg8bit.png"))
    assert len(pngs) == 4  # labelId PNGs for cityscapesscripts
    assert len(list((evald / "vis").glob("*.jpg"))) == 2


def test_detector_on_segmentation_data_is_refused(tmp_path: Path) -> None:
    cmd = tool("train.py", "model=efficientdet_d0", "data=synthetic_cityscapes", f"hydra.run.dir={tmp_path / 'run'}", datasets=tmp_path)
    done = subprocess.run(cmd, env=env_for(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "(arch efficientdet) does not fit data=synthetic_cityscapes, a segmentation dataset" in done.stderr


def test_summary_tool_describes_a_segmenter(tmp_path: Path) -> None:
    done = subprocess.run(tool("summary.py", "model=eseg_lite_s", "image_size=[128,256]", datasets=tmp_path), env=env_for(tmp_path),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "BiFPN P3-P9" in done.stdout and "logits [1, 19, 128, 256]" in done.stdout
