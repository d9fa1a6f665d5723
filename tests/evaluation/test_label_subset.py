"""A 90-class COCO head scored on a dataset with fewer categories: the missing labels never take a detection slot."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch

import densekit
from densekit.data.coco import CocoDetection
from densekit.data.transforms import build_eval_transform
from densekit.data.loader import build_loader
from densekit.evaluation.loop import evaluate_detector
from densekit.tasks.detection import NOT_IN_DATASET, label_map_for_model


def coco_subset_dataset(tmp_path: Path) -> CocoDetection:
    (tmp_path / "img").mkdir()
    images, anns = [], []
    for i in range(2):
        cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), np.full((96, 128, 3), 40 * i, np.uint8))
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 96, "width": 128})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0})
    # COCO ids 1 (person), 3 (car), 27 (backpack): label 25 (id 26) is one COCO 2017 never uses
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 27, "name": "backpack"}]
    ann_file = tmp_path / "val.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return CocoDetection(tmp_path / "img", ann_file, transform=build_eval_transform(128), train=False)


def test_missing_labels_are_dropped_before_the_top_100(tmp_path: Path) -> None:
    dataset = coco_subset_dataset(tmp_path)
    model = densekit.create_model("efficientdet_d0", image_size=[128, 128], neck={"channels": 16, "repeats": 1}).eval()
    with torch.no_grad():  # make a label the dataset lacks (25 = id 26) dominate every anchor
        bias = model.head.class_net.predict.conv_pw.bias.view(9, 90)
        bias.fill_(-6.0)
        bias[:, 25] = 5.0
        bias[:, 0] = -1.0
        bias[:, 2] = -2.0
    label_map = label_map_for_model(dataset, model.num_classes)
    assert label_map[0] == 1 and label_map[25] == NOT_IN_DATASET and label_map[26] == 27
    loader = build_loader(dataset, 2, train=False, num_workers=0, distributed=False)
    evaluate_detector(model, dataset, loader, torch.device("cpu"), tmp_path / "out", "val", "d0", label_map,
                      score_threshold=0.0)
    results = json.loads((tmp_path / "out" / "detections_val.json").read_text())
    assert {r["category_id"] for r in results} <= {1, 3, 27}
    per_image = {i: sum(r["image_id"] == i for r in results) for i in (1, 2)}
    assert per_image == {1: 100, 2: 100}  # 100 kept of the dataset's classes, none lost to label 25
    assert model.postprocessor.label_mask is None  # restored after evaluation
