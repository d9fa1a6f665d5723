"""docs/custom_data.md, run: every command of its bash blocks, on a tiny dataset, in order.

The doc's variable lines (``DATA=...``) are replaced by this test's files; each tool command gets a few
size-limiting overrides appended (Hydra: the last value of a key wins). Everything else runs as written.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "custom_data.md"

TINY = {  # (tool, task) -> overrides appended to the doc's command
    ("train.py", "det"): ["train.max_steps=2", "train.batch_size=2", "train.num_workers=0", "data.image_size=128"],
    ("train.py", "seg"): ["train.max_steps=2", "train.batch_size=2", "train.num_workers=0", "data.crop_size=[64,96]"],
    ("eval.py", "det"): ["eval.num_workers=0", "data.image_size=128"],
    ("eval.py", "seg"): ["eval.num_workers=0"],
    ("predict.py", "det"): ["predict.image_size=128"],
    ("export.py", "det"): ["image_size=128"],
}


def doc_commands() -> tuple[list[str], list[str]]:
    """(variable names the doc sets, the commands) of the doc's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    variables = [line.split("=", 1)[0] for line in lines if re.fullmatch(r"[A-Z_]+=\S+", line)]
    return variables, [line for line in lines if not re.fullmatch(r"[A-Z_]+=\S+", line)]


def write_voc(root: Path) -> None:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    cv2.imwrite(str(root / "JPEGImages" / "a.jpg"), np.zeros((60, 80, 3), np.uint8))
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>80</width><height>60</height><depth>3</depth></size>"
        "<object><name>dog</name><difficult>0</difficult><bndbox><xmin>5</xmin><ymin>6</ymin><xmax>40</xmax>"
        "<ymax>50</ymax></bndbox></object></annotation>"
    )
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("a\n")


def write_yolo(root: Path) -> None:
    (root / "images" / "train").mkdir(parents=True), (root / "labels" / "train").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "train" / "x.jpg"), np.zeros((64, 64, 3), np.uint8))
    (root / "labels" / "train" / "x.txt").write_text("0 0.5 0.5 0.25 0.5\n")
    (root / "data.yaml").write_text("names: [cat]\n")


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory, custom_coco, custom_seg) -> dict:
    """Run every command of the doc once, in order; returns the workspace variables and each tool's output."""
    from effdet import EfficientDet as EffDet, get_efficientdet_config

    tmp_path = tmp_path_factory.mktemp("walkthrough")
    data = tmp_path / "my_dataset"
    shutil.copytree(custom_coco["images"], data / "images")
    shutil.copy(custom_coco["train"], data / "train.json"), shutil.copy(custom_coco["val"], data / "val.json")
    weights = tmp_path / "tf_efficientdet_lite0.pth"  # a COCO-layout (90-class) checkpoint, random weights
    torch.save(EffDet(get_efficientdet_config("tf_efficientdet_lite0"), pretrained_backbone=False).state_dict(), weights)
    write_voc(tmp_path / "voc"), write_yolo(tmp_path / "yolo")
    workspace = {"DATA": str(data), "RUN": str(tmp_path / "run"), "WEIGHTS": str(weights), "VOC": str(tmp_path / "voc"),
                 "YOLO": str(tmp_path / "yolo"), "SEG": str(custom_seg["root"])}
    variables, commands = doc_commands()
    assert sorted(variables) == sorted(workspace)  # the doc's inputs are exactly the ones this test provides
    env = {**os.environ, **workspace, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    outputs = {}
    for command in commands:
        assert command.startswith(".venv/bin/python tools/"), command
        tool = command.split()[1].removeprefix("tools/")
        task = "seg" if "data=custom_seg" in command else "det"
        line = command.replace(".venv/bin/python", sys.executable, 1) + " " + " ".join(TINY.get((tool, task), []))
        done = subprocess.run(["bash", "-c", line], env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        outputs[(tool, task)] = outputs.get((tool, task), "") + done.stdout + done.stderr
    return {"run": Path(workspace["RUN"]), "data": data, "outputs": outputs}


def cocoeval_stats(gt_file: Path, detections: list[dict]) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(detections), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return [float(s) for s in ev.stats]


def test_converters_write_coco_json(walkthrough: dict) -> None:
    data = walkthrough["data"]
    assert json.loads((data / "voc_trainval.json").read_text())["annotations"][0]["bbox"] == [5.0, 6.0, 35.0, 44.0]
    assert json.loads((data / "yolo_train.json").read_text())["categories"] == [{"id": 1, "name": "cat"}]


def test_training_fine_tunes_from_coco_and_records_the_datasets_classes(walkthrough: dict) -> None:
    out = walkthrough["outputs"][("train.py", "det")]
    assert "fine-tuning from" in out and "90 -> 3 classes" in out
    state = torch.load(walkthrough["run"] / "checkpoints" / "last.pth", weights_only=True)
    # categories listed as 17, 5, 9 in the json: labels follow sorted ids (5 box, 9 wedge, 17 sphere)
    assert state["config"]["model"]["num_classes"] == 3
    assert state["config"]["model"]["class_names"] == ["box", "wedge", "sphere"]
    assert state["model"]["head.class_net.predict.conv_pw.bias"].shape == (27,)  # 9 anchors x 3 classes


def test_eval_on_custom_data_equals_pycocotools_on_its_detections(walkthrough: dict, custom_coco) -> None:
    out = walkthrough["run"] / "eval"
    detections = json.loads((out / "detections_val.json").read_text())
    assert detections and {d["category_id"] for d in detections} <= {5, 9, 17}  # the json's own ids
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_class_ap"]) == {"box", "wedge", "sphere"}
    # tools/eval.py keeps detections scoring >= eval.score_threshold (0.001): COCOeval sees exactly the file
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert [metrics[n] for n in names] == pytest.approx(cocoeval_stats(custom_coco["val"], detections)[:6], abs=1e-12)
    assert len(list((out / "vis").glob("*.jpg"))) == 4


def test_predict_and_export_write_their_files(walkthrough: dict) -> None:
    run, data = walkthrough["run"], walkthrough["data"]
    predictions = json.loads((run / "predict" / "predictions.json").read_text())
    assert predictions and list((run / "predict" / "pictures").rglob("*.jpg"))
    assert json.loads((run / "predict_val" / "predictions.json").read_text())["input"] == str(data / "images")
    assert (run / "lite0_custom.onnx").stat().st_size > 1_000_000


def test_custom_segmentation_miou_equals_a_confusion_matrix_of_the_written_pngs(walkthrough: dict, custom_seg) -> None:
    run = walkthrough["run"]
    state = torch.load(run / "seg" / "checkpoints" / "last.pth", weights_only=True)
    assert state["config"]["model"]["class_names"] == ["ground", "block", "disc"]
    metrics = json.loads((run / "seg_eval" / "metrics.json").read_text())
    conf = np.zeros((3, 3), np.int64)
    labels = sorted((custom_seg["root"] / "labels" / "val").rglob("*.png"))
    for label_file in labels:
        rel = label_file.relative_to(custom_seg["root"] / "labels" / "val")  # predictions keep the sub-folders
        pred = cv2.imread(str(run / "seg_eval" / "pred_val" / rel), cv2.IMREAD_UNCHANGED)
        gt = cv2.imread(str(label_file), cv2.IMREAD_UNCHANGED)
        valid = gt != 255
        conf += np.bincount(3 * gt[valid].astype(np.int64) + pred[valid], minlength=9).reshape(3, 3)
    tp = np.diag(conf)
    with np.errstate(invalid="ignore"):
        iou = tp / (conf.sum(0) + conf.sum(1) - tp)
    per_class = [metrics["per_class_iou"][n] for n in ("ground", "block", "disc")]
    assert per_class == pytest.approx(iou.tolist(), nan_ok=True)
    assert metrics["mIoU"] == pytest.approx(np.nanmean(iou))
