"""The synthetic shapes dataset: determinism, idempotence, COCO validity, tight boxes, and loading it for training."""
from __future__ import annotations

import contextlib
import io
import json

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from densekit.data import (
    CocoDetection,
    build_loader,
    build_train_transform,
    ensure_synthetic_coco,
    synthetic_coco_paths,
)
from densekit.data.synthetic import _draw_image

SMALL = dict(num_train=10, num_val=4)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return ensure_synthetic_coco(tmp_path_factory.mktemp("synthetic"), **SMALL)


def test_deterministic(synthetic_root, tmp_path):
    again = ensure_synthetic_coco(tmp_path / "again", **SMALL)
    other = ensure_synthetic_coco(tmp_path / "other", **SMALL, seed=1)
    for split in ("train", "val"):
        dir_a, json_a = synthetic_coco_paths(synthetic_root, split)
        dir_b, json_b = synthetic_coco_paths(again, split)
        assert json_a.read_bytes() == json_b.read_bytes()
        assert (dir_a / "000003.jpg").read_bytes() == (dir_b / "000003.jpg").read_bytes()
        ann_other = synthetic_coco_paths(other, split)[1]
        assert json.loads(ann_other.read_text())["annotations"] != json.loads(json_a.read_text())["annotations"]


def test_pycocotools_loads_it(synthetic_root):
    image_dir, ann_file = synthetic_coco_paths(synthetic_root, "train")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_file))
    assert sorted(coco.getCatIds()) == [3, 7, 12, 25, 40]
    assert [c["name"] for c in coco.loadCats([3, 7, 12, 25, 40])] == ["circle", "square", "triangle", "cross", "ring"]
    assert len(coco.getImgIds()) == 10
    assert len(coco.getAnnIds(imgIds=[8])) == 0  # every 25th image, from index 7, is empty
    sizes = set()
    for img in coco.loadImgs(coco.getImgIds()):
        decoded = cv2.imread(str(image_dir / img["file_name"]))
        assert decoded.shape[:2] == (img["height"], img["width"])
        sizes.add((img["height"], img["width"]))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert len(anns) <= 6
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
            assert min(w, h) >= 8 and ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h
    assert len(sizes) > 5  # image sizes vary


def test_boxes_are_tight():
    # Before JPEG: saturated (shape) pixels of each object reach all four sides of its box and none lie just
    # outside it, except where another object's box is.
    for i in range(20):
        image, objects = _draw_image(np.random.default_rng([5, i]), empty=False)
        rgb = image.astype(np.int16)
        saturated = (rgb.max(2) - rgb.min(2)) > 100
        boxes = np.array([[x, y, x + w, y + h] for _, (x, y, w, h), _ in objects], dtype=int)
        covered = np.zeros_like(saturated)
        for x1, y1, x2, y2 in boxes:
            covered[y1:y2, x1:x2] = True
        assert not (saturated & ~covered).any()
        for x1, y1, x2, y2 in boxes:
            inside = saturated[y1:y2, x1:x2]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_idempotent_and_repairs(synthetic_root, tmp_path):
    root = ensure_synthetic_coco(tmp_path / "s", **SMALL)
    image_dir, ann_file = synthetic_coco_paths(root, "train")
    stamp = ann_file.stat().st_mtime_ns
    ensure_synthetic_coco(root, **SMALL)
    assert ann_file.stat().st_mtime_ns == stamp  # complete: nothing rewritten
    (image_dir / "000004.jpg").unlink()
    ann_file.write_text(ann_file.read_text()[:100])  # interrupted writes
    ensure_synthetic_coco(root, **SMALL)
    assert (image_dir / "000004.jpg").is_file()
    assert ann_file.read_bytes() == synthetic_coco_paths(synthetic_root, "train")[1].read_bytes()
    ensure_synthetic_coco(root, num_train=6, num_val=4)  # other settings: regenerated, stale images removed
    assert len(json.loads(ann_file.read_text())["images"]) == 6 and len(list(image_dir.glob("*.jpg"))) == 6
    assert not list(ann_file.parent.glob("*.tmp"))


def test_trainable_through_loader(synthetic_root):
    ds = CocoDetection(*synthetic_coco_paths(synthetic_root, "train"), transform=build_train_transform(128))
    assert ds.label_to_cat_id == [3, 7, 12, 25, 40]
    loader = build_loader(ds, batch_size=4, train=True, num_workers=0)
    assert len(loader) == 2  # 10 images, last incomplete batch dropped
    for images, targets in loader:
        assert images.shape == (4, 3, 128, 128)
        for t in targets:
            assert ((t["labels"] >= 0) & (t["labels"] < 5)).all()
