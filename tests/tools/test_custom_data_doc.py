"""docs/custom_data.md, run: every command of its bash blocks, on a tiny dataset, in order.

The doc's variable lines (``DATA=...``) are replaced by this test's files; each tool command gets a few
size-limiting overrides appended (Hydra: the last value of a key wins). Everything else runs as written.
"""
from __future__ import annotations

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


@pytest.fixture()
def workspace(tmp_path: Path, custom_coco, custom_seg) -> dict[str, str]:
    from effdet import EfficientDet as EffDet, get_efficientdet_config

    data = tmp_path / "my_dataset"
    shutil.copytree(custom_coco["images"], data / "images")
    shutil.copy(custom_coco["train"], data / "train.json"), shutil.copy(custom_coco["val"], data / "val.json")
    weights = tmp_path / "tf_efficientdet_lite0.pth"  # a COCO-layout (90-class) checkpoint, random weights
    torch.save(EffDet(get_efficientdet_config("tf_efficientdet_lite0"), pretrained_backbone=False).state_dict(), weights)
    write_voc(tmp_path / "voc"), write_yolo(tmp_path / "yolo")
    return {"DATA": str(data), "RUN": str(tmp_path / "run"), "WEIGHTS": str(weights), "VOC": str(tmp_path / "voc"),
            "YOLO": str(tmp_path / "yolo"), "SEG": str(custom_seg["root"])}


def test_every_command_of_the_custom_data_walkthrough_runs(workspace: dict[str, str]) -> None:
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
        outputs[(tool, task)] = done.stdout + done.stderr

    run, data = Path(workspace["RUN"]), Path(workspace["DATA"])
    assert "fine-tuning from" in outputs[("train.py", "det")] and "90 -> 3 classes" in outputs[("train.py", "det")]
    assert json.loads((data / "voc_trainval.json").read_text())["annotations"][0]["bbox"] == [5.0, 6.0, 35.0, 44.0]
    assert json.loads((data / "yolo_train.json").read_text())["categories"] == [{"id": 1, "name": "cat"}]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["per_class_ap"]) == {"box", "wedge", "sphere"}
    assert len(list((run / "eval" / "vis").glob("*.jpg"))) == 4
    predictions = json.loads((run / "predict" / "predictions.json").read_text())
    assert predictions and list((run / "predict" / "pictures").rglob("*.jpg"))
    assert json.loads((run / "predict_val" / "predictions.json").read_text())["input"] == str(data / "images")
    assert (run / "lite0_custom.onnx").stat().st_size > 1_000_000
    seg = json.loads((run / "seg_eval" / "metrics.json").read_text())
    assert set(seg["per_class_iou"]) == {"ground", "block", "disc"} and list((run / "seg_eval" / "pred_val").rglob("*.png"))
