"""benchmarks/sliced_inference.py: the mosaic builder (boxes shifted with their pixels, a json pycocotools reads) and
the two recalls at IoU 0.5."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from benchmarks.sliced_inference import build_mosaics, layout, mosaic_order, recall_cocoeval, recall_matched

pytest.importorskip("pycocotools")


def _split(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """Images of ``(height, width)`` in ``sizes``, a random background with one or two solid boxes each; their json."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    images, annotations = [], []
    for index, (h, w) in enumerate(sizes):
        image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        for k in range(1 + index % 2):
            bw, bh = int(rng.integers(6, w // 2)), int(rng.integers(6, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            image[y:y + bh, x:x + bw] = (200 + 20 * k, 50, 100)
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": 7 + 5 * k,
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        cv2.imwrite(str(folder / f"{index}.png"), image[..., ::-1])
        images.append({"id": index + 1, "file_name": f"{index}.png", "height": h, "width": w})
    path = folder / "split.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 7, "name": "a"}, {"id": 12, "name": "b"}]}))
    return path


def test_layout_packs_rows_at_native_size() -> None:
    offsets, height, width = layout([(10, 20), (30, 5), (7, 8), (4, 4)], grid=2)
    assert offsets == [(0, 0), (20, 0), (0, 30), (8, 30)]
    assert (height, width) == (37, 25)


def test_mosaic_order_uses_every_image_equally() -> None:
    groups = mosaic_order(5, 4, 5, seed=1)
    counts = np.bincount([i for g in groups for i in g], minlength=5)
    assert [len(g) for g in groups] == [4] * 5 and counts.tolist() == [4] * 5


def test_mosaic_boxes_move_with_their_pixels_and_pycocotools_reads_the_json(tmp_path: Path) -> None:
    sizes = [(40, 50), (64, 30), (33, 47), (50, 50), (20, 70)]
    ann_path = _split(tmp_path / "src", sizes)
    source = json.loads(ann_path.read_text())
    coco = build_mosaics(tmp_path / "src", ann_path, tmp_path / "out", grid=2, seed=0)
    assert len(coco["images"]) == 2  # ceil(5 / 4)
    src_images = {im["id"]: im for im in source["images"]}
    src_anns = {}
    for ann in source["annotations"]:
        src_anns.setdefault(ann["image_id"], []).append(ann)
    mosaic_anns = {}
    for ann in coco["annotations"]:
        mosaic_anns.setdefault(ann["image_id"], []).append(ann)
    for mosaic, placed in zip(coco["images"], coco["placements"]):
        canvas = cv2.imread(str(tmp_path / "out" / "images" / mosaic["file_name"]))[..., ::-1]
        assert canvas.shape[:2] == (mosaic["height"], mosaic["width"])
        expected = []
        for src_id, x, y in placed:
            im = src_images[src_id]
            original = cv2.imread(str(tmp_path / "src" / im["file_name"]))[..., ::-1]
            assert np.array_equal(canvas[y:y + im["height"], x:x + im["width"]], original)  # lossless PNG, pixels moved
            for ann in src_anns[src_id]:
                bx, by, bw, bh = ann["bbox"]
                expected.append((ann["category_id"], bx + x, by + y, bw, bh))
                # the box still frames its solid colour on the canvas
                assert (canvas[by + y:by + y + bh, bx + x:bx + x + bw, 1] == 50).all()
        got = sorted((a["category_id"], *a["bbox"]) for a in mosaic_anns[mosaic["id"]])
        assert got == sorted(expected)
    # a valid COCO json: the ground truth as detections scores AP 1 and recall 1
    ann = tmp_path / "out" / "val.json"
    written = json.loads(ann.read_text())
    assert {c["id"] for c in written["categories"]} == {7, 12}
    assert len({a["id"] for a in written["annotations"]}) == len(written["annotations"])
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in written["annotations"]]
    assert recall_cocoeval(ann, perfect) == pytest.approx(1.0)
    assert recall_matched(ann, perfect) == (1.0, len(perfect), len(perfect))
    # every other box moved far off its object, one left below the score threshold
    damaged = [dict(d, bbox=[d["bbox"][0] + 10_000, *d["bbox"][1:]]) if i % 2 else d for i, d in enumerate(perfect)]
    damaged[0] = dict(damaged[0], score=0.01)
    expected_matched = len(perfect[2::2])
    assert recall_matched(ann, damaged)[1] == expected_matched
    assert 0.0 < recall_cocoeval(ann, damaged) < 1.0
