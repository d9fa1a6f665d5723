"""A user's own COCO-format dataset by path (data=custom) through tools/train.py and tools/eval.py."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = ["model=efficientdet_d0", "model.neck.repeats=1", "model.neck.channels=16", "model.head.repeats=1"]


def custom_data(paths: dict, val: bool = True) -> list[str]:
    keys = [f"data.train_images={paths['images']}", f"data.train_annotations={paths['train']}"]
    if val:
        keys += [f"data.val_images={paths['images']}", f"data.val_annotations={paths['val']}"]
    return ["data=custom", "data.image_size=128", "data.augment.scale_range=[0.8,1.2]", *keys]


def run_tool(name: str, *overrides: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "DENSEKIT_DATASETS": str(tmp)}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / name), *overrides], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def custom_run(custom_coco, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("custom_run")
    run_tool("train.py", *TINY_MODEL, *custom_data(custom_coco), "train.max_steps=3", "train.batch_size=4",
             "train.num_workers=0", "train.backbone_weights=none", f"hydra.run.dir={run}", tmp=run)
    return run


def cocoeval_stats(gt_file: Path, detections: list[dict]) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(detections), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return [float(s) for s in ev.stats]


def test_custom_dataset_trains_with_its_categories_and_records_class_names(custom_run: Path, custom_coco) -> None:
    state = torch.load(custom_run / "checkpoints" / "last.pth", weights_only=True)
    model_cfg = state["config"]["model"]
    # categories listed as 17, 5, 9: labels follow sorted ids (5 box, 9 wedge, 17 sphere)
    assert model_cfg["num_classes"] == 3 and model_cfg["class_names"] == ["box", "wedge", "sphere"]
    assert state["model"]["head.class_net.predict.conv_pw.bias"].shape == (27,)  # 9 anchors x 3 classes
    final = json.loads((custom_run / "metrics.json").read_text())["final"]
    assert set(final["per_class_ap"]) == {"box", "wedge", "sphere"}


def test_eval_tool_on_custom_data_equals_pycocotools_on_its_detections(custom_run: Path, custom_coco, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    run_tool("eval.py", *TINY_MODEL, *custom_data(custom_coco), f"weights={custom_run / 'checkpoints' / 'last.pth'}",
             "eval.num_workers=0", "eval.score_threshold=0.0", f"hydra.run.dir={out}", tmp=tmp_path)
    detections = json.loads((out / "detections_val.json").read_text())
    assert detections and {d["category_id"] for d in detections} <= {5, 9, 17}
    metrics = json.loads((out / "metrics.json").read_text())
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    expected = cocoeval_stats(custom_coco["val"], detections)
    assert [metrics[n] for n in names] == pytest.approx(expected[:6], abs=1e-12)


def test_a_split_without_paths_is_named_with_the_keys_to_set(custom_coco, tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), *TINY_MODEL, *custom_data(custom_coco, val=False),
           "train.max_steps=1", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "data.val_images" in done.stderr and "data.val_annotations" in done.stderr


def custom_seg_data(paths: dict) -> list[str]:
    root = paths["root"]
    return ["data=custom_seg", f"data.classes={paths['classes']}", "data.crop_size=[64,96]",
            f"data.train_images={root / 'images' / 'train'}", f"data.train_labels={root / 'labels' / 'train'}",
            f"data.val_images={root / 'images' / 'val'}", f"data.val_labels={root / 'labels' / 'val'}"]


def test_custom_segmentation_trains_and_its_miou_equals_a_confusion_matrix_of_the_written_pngs(custom_seg, tmp_path: Path) -> None:
    import cv2
    import numpy as np

    run, out = tmp_path / "run", tmp_path / "eval"
    common = ["model=lraspp_mobilenet_v3_small", *custom_seg_data(custom_seg)]
    run_tool("train.py", *common, "train=seg_synthetic", "train.max_steps=3", "train.batch_size=3",
             "train.num_workers=0", "train.eval_every_epochs=0", f"hydra.run.dir={run}", tmp=tmp_path)
    state = torch.load(run / "checkpoints" / "last.pth", weights_only=True)
    assert state["config"]["model"]["class_names"] == ["ground", "block", "disc"]
    run_tool("eval.py", *common, f"weights={run / 'checkpoints' / 'last.pth'}", "data.write_predictions=true",
             "eval.visualize=1", "eval.num_workers=0", f"hydra.run.dir={out}", tmp=tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_class_iou"]) == {"ground", "block", "disc"}

    conf = np.zeros((3, 3), np.int64)
    labels = sorted((custom_seg["root"] / "labels" / "val").rglob("*.png"))
    for label_file in labels:
        rel = label_file.relative_to(custom_seg["root"] / "labels" / "val")
        pred = cv2.imread(str(out / "pred_val" / rel), cv2.IMREAD_UNCHANGED)
        gt = cv2.imread(str(label_file), cv2.IMREAD_UNCHANGED)
        valid = gt != 255
        conf += np.bincount(3 * gt[valid].astype(np.int64) + pred[valid], minlength=9).reshape(3, 3)
    tp = np.diag(conf)
    with np.errstate(invalid="ignore"):
        iou = tp / (conf.sum(0) + conf.sum(1) - tp)
    assert [metrics["per_class_iou"][n] for n in ("ground", "block", "disc")] == pytest.approx(iou.tolist(), nan_ok=True)
    assert metrics["mIoU"] == pytest.approx(np.nanmean(iou))
    assert len(list((out / "vis").glob("*.jpg"))) == 1
