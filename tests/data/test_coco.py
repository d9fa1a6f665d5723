"""CocoDetection on a tiny real COCO layout on disk: mapping, validation errors, and the real DataLoader."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from densekit.data import (
    CocoDetection,
    build_loader,
    build_eval_transform,
    build_train_transform,
    coco_paths,
    collate_batch,
)

W, H = 64, 48
CATEGORIES = [{"id": 40, "name": "dog"}, {"id": 5, "name": "airplane"}, {"id": 12, "name": "stop sign"}]


def _annotations() -> list[dict]:
    def ann(i: int, image_id: int, cat: int, bbox: list[float], crowd: int = 0) -> dict:
        return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": crowd, "area": 1.0}

    return [
        ann(101, 1, 5, [4, 6, 20, 10]),
        ann(102, 1, 40, [30, 20, 10, 12]),
        ann(103, 1, 12, [0, 0, 16, 16], crowd=1),
        ann(104, 1, 5, [10, 10, 0, 5]),  # zero width: dropped
        ann(105, 1, 40, [50, 40, 30, 30]),  # partly outside: clipped to [50, 40, 64, 48]
        ann(106, 1, 40, [70, 10, 5, 5]),  # entirely outside: dropped
        ann(201, 7, 12, [8, 8, 24, 24]),
    ]


def _write_coco(root: Path, annotations: list[dict] | None = None, categories: list[dict] | None = None) -> tuple:
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for image_id, name in [(1, "a.png"), (7, "b.png"), (3, "c.png")]:  # ids unsorted on purpose
        img = np.full((H, W, 3), 90, np.uint8)
        img[6:16, 4:24] = (255, 0, 0)  # BGR on disk: blue
        cv2.imwrite(str(image_dir / name), img)
        images.append({"id": image_id, "file_name": name, "width": W, "height": H})
    data = {
        "images": images,
        "annotations": _annotations() if annotations is None else annotations,
        "categories": CATEGORIES if categories is None else categories,
    }
    ann_file = root / "annotations.json"
    ann_file.write_text(json.dumps(data))
    return image_dir, ann_file


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path]:
    return _write_coco(tmp_path)


def test_category_mapping_roundtrip(coco):
    ds = CocoDetection(*coco, train=False)
    assert ds.cat_ids == ds.label_to_cat_id == [5, 12, 40]
    assert ds.class_names == ["airplane", "stop sign", "dog"]
    assert ds.num_classes == 3
    for cat_id in (5, 12, 40):
        assert ds.label_to_cat_id[ds.cat_id_to_label[cat_id]] == cat_id
    assert ds.image_ids == [1, 3, 7]
    _, target = ds[ds.image_ids.index(7)]
    assert [ds.label_to_cat_id[int(label)] for label in target["labels"]] == [12]


def test_train_keeps_crowd_as_ignore_and_cleans_boxes(coco, caplog):
    with caplog.at_level(logging.WARNING, logger="densekit.data.coco"):
        ds = CocoDetection(*coco, train=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one summary, not one line per box
    msg = warnings[0].getMessage()
    assert "dropped 1 zero-area boxes and 1 boxes entirely outside" in msg and "clipped 1 boxes" in msg
    assert "annotations.json" in msg and "104" in msg

    image, target = ds[0]  # image id 1
    assert image.shape == (3, H, W) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert torch.allclose(image[:, 10, 10], torch.tensor([0.0, 0.0, 1.0]))  # BGR on disk -> RGB
    assert target["image_id"] == 1 and target["orig_size"] == (H, W) and target["size"] == (H, W)
    assert target["scale"] == 1.0
    assert target["labels"].dtype == torch.int64 and target["boxes"].dtype == torch.float32
    assert target["labels"].tolist() == [0, 2, -2, 2]
    expected = [[4, 6, 24, 16], [30, 20, 40, 32], [0, 0, 16, 16], [50, 40, 64, 48]]
    assert target["boxes"].tolist() == expected


def test_eval_drops_crowd_and_keeps_images_without_boxes(coco):
    ds = CocoDetection(*coco, train=False)
    assert len(ds) == 3
    _, target = ds[0]
    assert target["labels"].tolist() == [0, 2, 2]
    _, empty = ds[ds.image_ids.index(3)]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    # The pycocotools object keeps the ground truth (crowd included) for COCOeval, cleaned as training's boxes are:
    # the zero-area and the wholly outside box dropped, the partly outside one clipped.
    assert len(ds.coco.getAnnIds(imgIds=[1])) == 4 and len(ds.coco.getAnnIds(imgIds=[3])) == 0
    assert ds.coco.anns[105]["bbox"] == [50.0, 40.0, 14.0, 8.0] and 104 not in ds.coco.anns and 106 not in ds.coco.anns


def test_eval_loader_batches_and_scale(coco):
    ds = CocoDetection(*coco, transform=build_eval_transform(128), train=False)
    loader = build_loader(ds, batch_size=3, train=False, num_workers=0)
    images, targets = next(iter(loader))
    assert images.shape == (3, 3, 128, 128)
    t = targets[0]
    assert t["scale"] == 2.0 and t["size"] == (96, 128) and t["orig_size"] == (H, W)
    np.testing.assert_allclose(t["boxes"].numpy() / t["scale"], [[4, 6, 24, 16], [30, 20, 40, 32], [50, 40, 64, 48]])
    assert targets[1]["boxes"].shape == (0, 4)  # image id 3, no boxes


def test_train_loader_runs_and_is_reproducible(coco):
    ds = CocoDetection(*coco, transform=build_train_transform(64), train=True)

    def first_batch():
        loader = build_loader(ds, batch_size=2, train=True, num_workers=0, seed=3)
        return next(iter(loader))

    (images_a, targets_a), (images_b, targets_b) = first_batch(), first_batch()
    assert images_a.shape == (2, 3, 64, 64)
    assert torch.equal(images_a, images_b)
    assert [t["image_id"] for t in targets_a] == [t["image_id"] for t in targets_b]
    for t in targets_a:
        assert len(t["boxes"]) == len(t["labels"])
        assert (t["boxes"] >= 0).all() and (t["boxes"] <= 64).all()


def test_workers_get_different_but_reproducible_augmentations(coco):
    # All three images are 64 x 48, so each target's scale is one draw of the scale jitter. In order, without
    # shuffling, worker 0 gets images 0 and 2 and worker 1 image 1: equal first draws would mean shared seeds.
    ds = CocoDetection(*coco, transform=build_train_transform(64), train=True)

    def scales() -> list[float]:
        loader = build_loader(ds, batch_size=1, train=False, num_workers=2, seed=0)
        return [targets[0]["scale"] for _, targets in loader]

    first = scales()
    assert first[0] != first[1]
    assert scales() == first


def test_loader_refuses_to_yield_nothing(coco):
    ds = CocoDetection(*coco, train=True)
    with pytest.raises(ValueError, match="yields no batches"):
        build_loader(ds, batch_size=4, train=True, num_workers=0)
    assert len(build_loader(ds, batch_size=4, train=True, num_workers=0, drop_last=False)) == 1


def test_collate_pads_different_sizes():
    batch = [(torch.ones(3, 4, 6), {"image_id": 1}), (torch.ones(3, 5, 2), {"image_id": 2})]
    images, targets = collate_batch(batch)
    assert images.shape == (2, 3, 5, 6) and [t["image_id"] for t in targets] == [1, 2]
    assert images[0, :, 4:].abs().sum() == 0 and images[1, :, :, 2:].abs().sum() == 0
    assert images[0, :, :4, :].min() == 1 and images[1, :, :, :2].min() == 1


def test_missing_image_names_file(coco):
    image_dir, ann_file = coco
    (image_dir / "b.png").unlink()
    ds = CocoDetection(image_dir, ann_file, train=False)
    loader = build_loader(ds, batch_size=3, train=False, num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"b\.png.*image id 7"):
        next(iter(loader))


def test_corrupt_image_error_survives_worker(coco):
    image_dir, ann_file = coco
    (image_dir / "c.png").write_bytes(b"definitely not a png")
    ds = CocoDetection(image_dir, ann_file, transform=build_eval_transform(64), train=False)
    loader = build_loader(ds, batch_size=1, train=False, num_workers=1)
    with pytest.raises(OSError, match=r"cannot decode image file .*c\.png"):
        for _ in loader:
            pass


def test_image_size_mismatch_names_file(coco):
    image_dir, ann_file = coco
    cv2.imwrite(str(image_dir / "a.png"), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match=r"a\.png is 10x10 .* says 48x64"):
        CocoDetection(image_dir, ann_file)[0]


def test_unknown_category_names_annotation(tmp_path):
    anns = _annotations() + [{"id": 999, "image_id": 7, "category_id": 77, "bbox": [1, 1, 5, 5], "iscrowd": 0}]
    image_dir, ann_file = _write_coco(tmp_path, annotations=anns)
    with pytest.raises(ValueError, match=r"annotations\.json.*\[999\].*\[77\]"):
        CocoDetection(image_dir, ann_file)


def test_malformed_bbox_names_annotation(tmp_path):
    anns = _annotations() + [{"id": 555, "image_id": 7, "category_id": 5, "bbox": [1, 1, 5], "iscrowd": 0}]
    image_dir, ann_file = _write_coco(tmp_path, annotations=anns)
    with pytest.raises(ValueError, match=r"annotations\.json: annotation 555 .*'bbox'"):
        CocoDetection(image_dir, ann_file)


def test_annotation_for_unknown_image(tmp_path):
    anns = [{"id": 8, "image_id": 42, "category_id": 5, "bbox": [1, 1, 5, 5]}]
    image_dir, ann_file = _write_coco(tmp_path, annotations=anns)
    with pytest.raises(ValueError, match=r"annotations \[8\] refer to unknown image ids \[42\]"):
        CocoDetection(image_dir, ann_file)


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "is empty"),
        ('{"images": [', "is not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"annotations": []}', "missing or malformed 'images'"),
    ],
)
def test_bad_annotation_file_names_file(coco, content, match):
    image_dir, ann_file = coco
    ann_file.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        CocoDetection(image_dir, ann_file)
    assert str(ann_file) in str(info.value)


def test_missing_paths_name_them(coco, tmp_path):
    image_dir, ann_file = coco
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(image_dir, tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="no_images"):
        CocoDetection(tmp_path / "no_images", ann_file)


def test_image_info_only_file(tmp_path):
    image_dir, ann_file = _write_coco(tmp_path)
    data = json.loads(ann_file.read_text())
    del data["annotations"]  # like image_info_test-dev2017.json
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="train=False"):
        CocoDetection(image_dir, ann_file, train=True)
    ds = CocoDetection(image_dir, ann_file, transform=build_eval_transform(64), train=False)
    assert all(ds[i][1]["boxes"].shape == (0, 4) for i in range(len(ds)))


def test_coco_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEKIT_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"coco does not exist.*datasets/README\.md.*DENSEKIT_DATASETS"):
        coco_paths(split="val")
    (tmp_path / "coco").mkdir()
    assert coco_paths(split="val") == (tmp_path / "coco/val2017", tmp_path / "coco/annotations/instances_val2017.json")
    image_dir, ann_file = coco_paths(tmp_path / "coco", "test-dev")
    assert image_dir.name == "test2017" and ann_file.name == "image_info_test-dev2017.json"
    with pytest.raises(ValueError, match="unknown COCO split"):
        coco_paths(tmp_path / "coco", "minival")
