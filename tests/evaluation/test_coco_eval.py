"""CocoEvaluator against pycocotools run by hand on the same detections, plus submission files.

The reference detections are written directly in original pixels with original category ids; the evaluator gets
the same detections the way a model emits them (xyxy in model-input pixels, contiguous labels) and must reproduce
pycocotools' numbers exactly.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from densekit.evaluation import (
    COCO_METRIC_NAMES,
    CocoEvaluator,
    detections_to_coco,
    format_coco_table,
    write_results_json,
    write_test_dev_submission,
)

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 12, "name": "kite"}]
LABEL_TO_CAT_ID = [3, 7, 12]
# image id -> (width, height, scale); scales are powers of two or 1.25 so xyxy * scale stays exact in float32.
IMAGES = {10: (640, 480, 0.5), 11: (300, 500, 2.0), 12: (1000, 800, 1.25), 13: (200, 200, 2.0)}


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _make_gt() -> dict:
    """Several boxes per image over the three categories, sized small (<32^2), medium and large."""
    rng = np.random.default_rng(0)
    anns = []
    for image_id, (w, h, _) in IMAGES.items():
        for i, side in enumerate([12, 20, 50, 80, 150, 190]):
            bw, bh = float(side), float(side * rng.choice([0.75, 1.0]))
            x = float(rng.integers(0, int(w - bw))) + 0.5
            y = float(rng.integers(0, int(h - bh))) + 0.25
            anns.append({
                "id": len(anns) + 1, "image_id": image_id, "category_id": LABEL_TO_CAT_ID[(i + image_id) % 3],
                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0,
            })
    images = [{"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"} for i, (w, h, _) in IMAGES.items()]
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


@pytest.fixture(scope="module")
def gt_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("coco") / "instances.json"
    path.write_text(json.dumps(_make_gt()))
    return str(path)


@pytest.fixture()
def coco_gt(gt_path: str) -> COCO:
    return _quiet(COCO, gt_path)


def _reference_dets(gt: dict) -> list[dict]:
    """Detections in COCO result form, original pixels and category ids: jittered hits, misses, false positives."""
    rng = np.random.default_rng(1)
    dets = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        r = rng.random()
        if r < 0.15:
            continue  # missed
        cat = ann["category_id"] if r < 0.85 else LABEL_TO_CAT_ID[(LABEL_TO_CAT_ID.index(ann["category_id"]) + 1) % 3]
        jitter = rng.integers(-4, 5, size=4) * 0.25 * max(1.0, w / 20)
        # Kept inside the image, so that clipping only matters for the one box added for it in _scenario.
        img_w, img_h, _ = IMAGES[ann["image_id"]]
        x0, y0 = max(0.0, x + jitter[0]), max(0.0, y + jitter[1])
        x1, y1 = min(img_w, x0 + max(1.0, w + jitter[2])), min(img_h, y0 + max(1.0, h + jitter[3]))
        box = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
        dets.append({"image_id": ann["image_id"], "category_id": cat, "bbox": box,
                     "score": float(np.float32(rng.uniform(0.05, 1.0)))})
    for image_id, (w, h, _) in IMAGES.items():
        for _ in range(3):  # false positives
            bw, bh = float(rng.integers(8, 120)), float(rng.integers(8, 120))
            box = [float(rng.integers(0, w - bw)), float(rng.integers(0, h - bh)), bw, bh]
            dets.append({"image_id": image_id, "category_id": int(rng.choice(LABEL_TO_CAT_ID)), "bbox": box,
                         "score": float(np.float32(rng.uniform(0.01, 0.6)))})
    return dets


def _to_model_outputs(dets: list[dict], extra: dict[int, list[tuple]] | None = None) -> tuple[list, list]:
    """Re-expresses reference detections as model outputs/targets (xyxy in input pixels, contiguous labels).

    ``extra`` adds raw ``(xyxy_input_px, label, score)`` detections per image that the reference lacks.
    """
    outputs, targets = [], []
    for image_id, (w, h, scale) in IMAGES.items():
        mine = [d for d in dets if d["image_id"] == image_id]
        boxes = [[b[0] * scale, b[1] * scale, (b[0] + b[2]) * scale, (b[1] + b[3]) * scale]
                 for b in (d["bbox"] for d in mine)]
        labels = [LABEL_TO_CAT_ID.index(d["category_id"]) for d in mine]
        scores = [d["score"] for d in mine]
        for box, label, score in (extra or {}).get(image_id, []):
            boxes.append(list(box)), labels.append(label), scores.append(score)
        outputs.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
        })
        targets.append({"image_id": torch.tensor(image_id), "scale": scale, "orig_size": torch.tensor([h, w])})
    return outputs, targets


def _run_cocoeval(coco_gt: COCO, dets: list[dict], img_ids: list[int] | None = None,
                  cat_ids: list[int] | None = None) -> np.ndarray:
    def run() -> np.ndarray:
        ev = COCOeval(coco_gt, coco_gt.loadRes(json.loads(json.dumps(dets))), iouType="bbox")
        if img_ids is not None:
            ev.params.imgIds = img_ids
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate(), ev.accumulate(), ev.summarize()
        return ev.stats
    return _quiet(run)


def _scenario(coco_gt: COCO) -> tuple[list[dict], list, list]:
    """Reference detections, and model outputs holding them plus an out-of-image box and a sub-threshold hit."""
    gt = coco_gt.dataset
    ref = _reference_dets(gt)
    # A perfect hit on a GT box scoring 0.0005 must be dropped; if it were kept, AR would rise.
    ann = next(a for a in gt["annotations"] if a["image_id"] == 11 and a["bbox"][2] >= 150)
    x, y, w, h = ann["bbox"]
    s = IMAGES[11][2]
    low = ((x * s, y * s, (x + w) * s, (y + h) * s), LABEL_TO_CAT_ID.index(ann["category_id"]), 0.0005)
    # Image 10 is 640x480 at scale 0.5 (input 320x240): this box spills past the input, so past the image.
    spill = ((300.0, 200.0, 400.0, 300.0), 1, 0.7)
    outputs, targets = _to_model_outputs(ref, {10: [spill], 11: [low]})
    # Clipped to the 640x480 image by hand: (600, 400, 800, 600) -> (600, 400, 640, 480).
    ref.append({"image_id": 10, "category_id": 7, "bbox": [600.0, 400.0, 40.0, 80.0],
                "score": float(np.float32(0.7))})
    return ref, outputs, targets


def test_matches_pycocotools_with_scales_and_noncontiguous_ids(coco_gt: COCO) -> None:
    ref, outputs, targets = _scenario(coco_gt)
    ev = CocoEvaluator(coco_gt, LABEL_TO_CAT_ID)
    ev.update(outputs[:2], targets[:2])
    ev.update(outputs[2:], targets[2:])
    metrics = ev.evaluate()
    expected = _run_cocoeval(coco_gt, ref)
    assert [metrics[n] for n in COCO_METRIC_NAMES] == pytest.approx(expected.tolist(), abs=1e-12)
    # The scenario must be informative: not trivially perfect and covering every area range.
    assert 0.2 < metrics["AP"] < 0.95 and min(metrics[n] for n in ("APs", "APm", "APl")) >= 0

    assert set(metrics["per_class_ap"]) == {"cat", "dog", "kite"}
    for cat in CATEGORIES:
        only = _run_cocoeval(coco_gt, ref, cat_ids=[cat["id"]])
        assert metrics["per_class_ap"][cat["name"]] == pytest.approx(only[0], abs=1e-12)


def test_only_images_seen_are_evaluated(coco_gt: COCO) -> None:
    ref, outputs, targets = _scenario(coco_gt)
    ev = CocoEvaluator(coco_gt, LABEL_TO_CAT_ID, class_names=["c", "d", "k"])
    ev.update(outputs[1:3], targets[1:3])  # images 11 and 12
    metrics = ev.evaluate()
    expected = _run_cocoeval(coco_gt, [d for d in ref if d["image_id"] in (11, 12)], img_ids=[11, 12])
    assert [metrics[n] for n in COCO_METRIC_NAMES] == pytest.approx(expected.tolist(), abs=1e-12)
    assert list(metrics["per_class_ap"]) == ["c", "d", "k"]


def test_perfect_detections_score_one(coco_gt: COCO) -> None:
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in coco_gt.dataset["annotations"]]
    ev = CocoEvaluator(coco_gt, LABEL_TO_CAT_ID)
    ev.update(*_to_model_outputs(perfect))
    metrics = ev.evaluate()
    # AR1 is 0.5, not 1: each image holds two boxes of each category and AR1 allows one detection per category.
    assert all(metrics[n] == pytest.approx(1.0) for n in COCO_METRIC_NAMES if n != "AR1")
    assert metrics["AR1"] == pytest.approx(0.5)
    assert all(v == pytest.approx(1.0) for v in metrics["per_class_ap"].values())


def test_no_detections_gives_zeros(coco_gt: COCO) -> None:
    ev = CocoEvaluator(coco_gt, LABEL_TO_CAT_ID)
    assert ev.evaluate()["AP"] == 0.0  # nothing seen at all
    outputs, targets = _to_model_outputs([])
    ev.update(outputs, targets)
    # Everything below threshold is "no detections" too.
    ev.update([{"boxes": torch.tensor([[0.0, 0.0, 9.0, 9.0]]), "scores": torch.tensor([1e-4]),
                "labels": torch.tensor([0])}], targets[:1])
    metrics = ev.evaluate()
    assert ev.results() == []
    assert all(metrics[n] == 0.0 for n in COCO_METRIC_NAMES)
    assert metrics["per_class_ap"] == {"cat": 0.0, "dog": 0.0, "kite": 0.0}
    assert "AP50" in format_coco_table(metrics)


def test_detections_to_coco_clips_drops_and_maps_ids() -> None:
    outputs = [{
        "boxes": torch.tensor([[-10.0, -20.0, 500.0, 150.0], [10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 4.0, 4.0]]),
        "scores": torch.tensor([0.5, 0.0009, 0.001]),
        "labels": torch.tensor([2, 0, 1]),
    }]
    targets = [{"image_id": 5, "scale": torch.tensor(2.0), "orig_size": (100, 200)}]
    res = detections_to_coco(outputs, targets, [3, 7, 12])
    assert [r["category_id"] for r in res] == [12, 7]
    assert res[0]["bbox"] == pytest.approx([0.0, 0.0, 200.0, 75.0])  # clipped to W=200 after /2
    assert res[1]["bbox"] == pytest.approx([0.0, 0.0, 2.0, 2.0])
    assert res[0]["image_id"] == 5 and isinstance(res[0]["image_id"], int)
    assert res[0]["score"] == pytest.approx(0.5)
    assert len(detections_to_coco(outputs, targets, [3, 7, 12], score_threshold=0.0)) == 3
    with pytest.raises(ValueError, match="labels"):
        detections_to_coco(outputs, targets, [3, 7])


def test_format_coco_table_fits_one_screen() -> None:
    metrics = {n: 0.1 * i for i, n in enumerate(COCO_METRIC_NAMES)}
    metrics["APs"] = -1.0
    metrics["per_class_ap"] = {f"class number {i}": i / 80 for i in range(80)}
    text = format_coco_table(metrics)
    lines = text.splitlines()
    assert len(lines) <= 40 and max(len(line) for line in lines) <= 80
    assert "AR100" in lines[2] and "n/a" in lines[1]
    assert "class number 79" in text and "0.988" in text


def test_write_results_json_atomic(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "res.json"
    write_results_json([{"image_id": 1, "score": 0.5}], path)
    assert json.loads(path.read_text()) == [{"image_id": 1, "score": 0.5}]
    with pytest.raises(TypeError):
        write_results_json([{"image_id": object()}], path)  # not serialisable: the old file must survive
    assert json.loads(path.read_text()) == [{"image_id": 1, "score": 0.5}]
    assert os.listdir(path.parent) == ["res.json"]


def test_test_dev_submission(tmp_path: Path) -> None:
    info = {"images": [{"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"}
                       for i, (w, h, _) in IMAGES.items()], "categories": CATEGORIES}
    info_path = tmp_path / "image_info_test-dev2017.json"
    info_path.write_text(json.dumps(info))
    coco_info = _quiet(COCO, str(info_path))
    ev = CocoEvaluator(coco_info, LABEL_TO_CAT_ID)
    ev.update([{"boxes": torch.tensor([[10.0, 20.0, 50.0, 100.0]]), "scores": torch.tensor([0.8]),
                "labels": torch.tensor([1])}],
              [{"image_id": 11, "scale": 2.0, "orig_size": (500, 300)}])

    json_path, zip_path = write_test_dev_submission(ev.results(), tmp_path / "out", "effdet-d0")
    assert json_path.name == "detections_test-dev2017_effdet-d0_results.json"
    assert zip_path.name == "detections_test-dev2017_effdet-d0_results.zip"
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.namelist() == [json_path.name]
        assert zf.read(json_path.name) == json_path.read_bytes()
    res = _quiet(_quiet(COCO, str(info_path)).loadRes, str(json_path))
    (ann,) = res.dataset["annotations"]
    assert ann["image_id"] == 11 and ann["category_id"] == 7
    assert ann["bbox"] == pytest.approx([5.0, 10.0, 20.0, 40.0])
    assert sorted(os.listdir(tmp_path / "out")) == sorted([json_path.name, zip_path.name])
    with pytest.raises(ValueError, match="model_name"):
        write_test_dev_submission([], tmp_path / "out", "eff_det")


def _distributed_worker(rank: int, world: int, init_file: str, gt_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        coco_gt = _quiet(COCO, gt_path)
        _, outputs, targets = _scenario(coco_gt)
        # Rank 0 gets images 10, 11, 12; rank 1 gets 12, 13: image 12 repeated as DistributedSampler pads.
        part = slice(0, 3) if rank == 0 else slice(2, 4)
        ev = CocoEvaluator(coco_gt, LABEL_TO_CAT_ID)
        ev.update(outputs[part], targets[part])
        metrics = ev.evaluate()  # synchronises itself
        Path(out_dir, f"{rank}.json").write_text(json.dumps({"metrics": metrics, "n": len(ev.results())}))
    finally:
        dist.destroy_process_group()


def test_distributed_matches_single_process(coco_gt: COCO, gt_path: str, tmp_path: Path, run_workers) -> None:
    _, outputs, targets = _scenario(coco_gt)
    single = CocoEvaluator(coco_gt, LABEL_TO_CAT_ID)
    single.update(outputs, targets)
    expected = single.evaluate()
    run_workers(_distributed_worker, (2, str(tmp_path / "init"), gt_path, str(tmp_path)))
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["n"] == len(single.results())
        assert got["metrics"].pop("per_class_ap") == pytest.approx(expected["per_class_ap"])
        assert got["metrics"] == pytest.approx({n: expected[n] for n in COCO_METRIC_NAMES})
