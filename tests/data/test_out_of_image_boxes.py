"""Boxes that run past their image: the converters clip them (and leave out what clipping empties) with a count in
the summary, CocoDetection's evaluation ground truth is clipped as its training boxes are, and so a detector that
predicts exactly the boxes training uses scores AP 1.0 (issue 23, item 2: it scored 0.42 against the raw json)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from densekit.cli import convert_dataset
from densekit.data.coco import CocoDetection
from densekit.data.converters import voc_to_coco, write_coco, yolo_to_coco
from densekit.evaluation.coco import CocoEvaluator

H, W = 40, 60


def run_tool(*argv: str | Path) -> str:
    """tools/convert_dataset.py's ``main(argv)`` (densekit.cli.convert_dataset) in-process; returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        convert_dataset.main([str(a) for a in argv])
    return out.getvalue()


def write_voc_xml(path: Path, filename: str, size: tuple[int, int], objects: list) -> None:
    parts = [f"<annotation><filename>{filename}</filename>"
             f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>"]
    for name, (x0, y0, x1, y1), difficult in objects:
        parts.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin>"
                     f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts) + "</annotation>\n")


def _image(path: Path, height: int = H, width: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((height, width, 3), 128, np.uint8))


def _score_exact_boxes(ds: CocoDetection) -> dict:
    """COCOeval (through the evaluator evaluate_detector uses) of detections equal to the dataset's boxes."""
    evaluator = CocoEvaluator(ds.coco, ds.label_to_cat_id, ds.class_names)
    for index, image_id in enumerate(ds.image_ids):
        boxes, labels = ds.annotations(index)
        output = {"boxes": torch.as_tensor(boxes), "scores": torch.ones(len(labels)), "labels": torch.as_tensor(labels)}
        target = {"image_id": image_id, "scale": 1.0, "orig_size": tuple(ds._sizes[index].tolist())}
        evaluator.update([output], [target])
    return evaluator.evaluate()


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    """Two images; boxes: inside, past the right and bottom edges, past the top-left corner, wholly outside."""
    root = tmp_path / "VOC"
    _image(root / "JPEGImages" / "a.png")
    _image(root / "JPEGImages" / "b.png")
    write_voc_xml(root / "Annotations" / "a.xml", "a.png", (H, W), [
        ("dog", (5, 5, 25, 20), 0),
        ("cat", (30, 10, 75, 52), 0),  # past the right and bottom edges: clipped to (30, 10, 60, 40)
        ("dog", (70, 5, 90, 20), 0),  # wholly right of the image: left out
    ])
    write_voc_xml(root / "Annotations" / "b.xml", "b.png", (H, W), [
        ("cat", (-8, -4, 20, 16), 0),  # past the top-left corner: clipped to (0, 0, 20, 16)
        ("dog", (10, 20, 50, 38), 0),
    ])
    return root


def test_voc_converter_clips_drops_and_counts(voc: Path, tmp_path: Path) -> None:
    out = tmp_path / "voc.json"
    printed = run_tool("--from", "voc", "--root", voc, "--out", out)
    assert "4 boxes" in printed
    assert "clipped 2 boxes that ran past their image to it" in printed and "a.xml object 2" in printed
    assert "skipped 1 (1 boxes entirely outside their image):" in printed
    assert "a.xml object 3: box lies entirely outside its image (xmin=70" in printed
    data = json.loads(out.read_text())
    boxes = sorted((a["bbox"], a["area"]) for a in data["annotations"])
    assert boxes == sorted([([5, 5, 20, 15], 300), ([30, 10, 30, 30], 900), ([0, 0, 20, 16], 320),
                            ([10, 20, 40, 18], 720)])


def test_converted_voc_with_out_of_image_box_scores_ap_one(voc: Path, caplog) -> None:
    """The acceptance case: the converted json is what training uses, so exact (clipped) boxes score AP 1.0."""
    conversion = voc_to_coco(voc / "Annotations", voc / "JPEGImages")
    ann_file = write_coco(conversion, voc / "voc.json")
    with caplog.at_level(logging.WARNING, logger="densekit.data.coco"):
        ds = CocoDetection(voc / "JPEGImages", ann_file, train=False)
    assert not caplog.records  # nothing for the loader to change: the json already holds the training boxes
    metrics = _score_exact_boxes(ds)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)


def test_user_coco_json_ground_truth_is_clipped_like_training(tmp_path: Path, caplog) -> None:
    """A hand-written json with out-of-image boxes: COCOeval's ground truth is the loader's boxes, area capped."""
    _image(tmp_path / "images" / "a.png")
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 20, 15], "area": 300, "iscrowd": 0},
        # past the right and bottom edges; area = raw box area (as converters and many tools write it)
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [30, 10, 45, 42], "area": 1890, "iscrowd": 0},
        # a mask area smaller than the clipped box: kept (it is what sorts the box into small/medium/large)
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [-10, 20, 30, 10], "area": 150, "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [70, 5, 10, 10], "area": 100, "iscrowd": 0},  # outside
        {"id": 5, "image_id": 1, "category_id": 3, "bbox": [8, 8, 0, 10], "area": 0, "iscrowd": 0},  # zero width
    ]
    data = {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}], "annotations": anns,
            "categories": [{"id": 3, "name": "thing"}]}
    ann_file = tmp_path / "user.json"
    ann_file.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="densekit.data.coco"):
        ds = CocoDetection(tmp_path / "images", ann_file, train=False)
    msg = caplog.records[0].getMessage()
    assert "user.json" in msg and "clipped 2 boxes" in msg and "dropped 1 zero-area boxes and 1 boxes" in msg
    assert "evaluation ground truth" in msg
    assert ds.box_fixes == {"zero_area": 1, "outside": 1, "clipped": 2}
    gt = {a["id"]: (a["bbox"], a["area"]) for a in ds.coco.dataset["annotations"]}
    assert gt == {1: ([5, 5, 20, 15], 300), 2: ([30.0, 10.0, 30.0, 30.0], 900.0), 3: ([0.0, 20.0, 20.0, 10.0], 150)}
    boxes, _ = ds.annotations(0)  # the training / evaluation loader's boxes, xyxy
    assert sorted(boxes.tolist()) == sorted([x, y, x + w, y + h] for (x, y, w, h), _ in gt.values())
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = _score_exact_boxes(ds)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)


def test_yolo_converter_clips_a_box_past_the_border(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "a.png")
    (tmp_path / "labels").mkdir()
    # 0: inside; 1: cx - w/2 < 0 (clipped to x in [0, 18]); 2: touches the right edge exactly (not reported)
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.1 0.5 0.4 0.5\n0 0.9 0.5 0.2 0.5\n")
    conversion = yolo_to_coco(tmp_path / "images", tmp_path / "labels", ["thing"])
    assert conversion.clipped == [f"{tmp_path / 'labels' / 'a.txt'}:2"]
    assert "clipped 1 boxes that ran past their image to it" in conversion.summary()
    x, y, w, h = conversion.coco["annotations"][1]["bbox"]
    assert (x, y, x + w, y + h) == pytest.approx((0, 10, 18, 30))
    for ann in conversion.coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= W and y + h <= H and ann["area"] == pytest.approx(w * h)
