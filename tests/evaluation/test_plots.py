"""eval.plots: the numbers each plot shows, checked against pycocotools and against hand counts on tiny datasets; the
PNGs are checked to be images, not pixel by pixel.

- PR curves: read from COCOeval's precision array; the area under each class's curve is that class's AP as
  pycocotools computes it for the class alone.
- Threshold curves and the confusion matrix: hand counts on a 3-image dataset (a correct detection, a wrong class,
  a false positive, a missed object, a low-scoring detection and one on a crowd region).
- Error breakdown (COCO ``analyze()``): C75 / C50 are pycocotools' AP75 / AP50, Loc its AP at IoU 0.1, FN 1 by
  definition; Sim / Oth / BG hand-computed on a 4-image dataset where each error kind occurs once.
- Segmentation: the row-normalised matrix and IoUs of a tiny confusion matrix; training: curves from metrics.json;
  the hooks plot only at the final evaluation.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from densekit.evaluation.plots import (
    plot_training_run,
    plots_line,
    write_detection_plots,
    write_segmentation_plots,
    write_training_plot,
)
from densekit.evaluation.plots.detection import confusion_matrix, curve_area, pr_curves, threshold_curves
from densekit.evaluation.plots.error_analysis import ERROR_TYPES, error_breakdown, format_error_table
from densekit.evaluation.plots.segmentation import SegSample, class_iou, error_map, row_normalized
from densekit.evaluation.plots.training import training_curves

CATEGORIES = [
    {"id": 1, "name": "cat", "supercategory": "animal"},
    {"id": 2, "name": "dog", "supercategory": "animal"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
]


def _ann(ann_id: int, image_id: int, cat: int, box: list[float], crowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": crowd}


def _det(image_id: int, cat: int, box: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


def _evaluate(annotations: list[dict], detections: list[dict], n_images: int, **params) -> COCOeval:
    """An accumulated bbox COCOeval (with ``params`` set) of ``detections`` on ``n_images`` 200x200 images."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i, "width": 200, "height": 200} for i in range(1, n_images + 1)],
                      "categories": CATEGORIES, "annotations": annotations}
        gt.createIndex()
        coco_eval = COCOeval(gt, gt.loadRes([dict(d) for d in detections]), "bbox")
        for key, value in params.items():
            setattr(coco_eval.params, key, value)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def _random_data(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """10 images, 6 boxes each: detections jittered, missed, of the wrong class, duplicated, or background."""
    rng = np.random.default_rng(seed)
    anns, dets = [], []
    for image_id in range(1, 11):
        for side in (12, 25, 40, 60, 80, 110):
            x, y = (float(v) for v in rng.uniform(0, 200 - side, 2))
            cat = int(rng.integers(1, 4))
            anns.append(_ann(len(anns) + 1, image_id, cat, [x, y, float(side), float(side)]))
            r = rng.random()
            if r < 0.15:
                continue  # missed
            jitter = rng.normal(0, side * 0.12, 4)
            box = [x + jitter[0], y + jitter[1], side * (1 + jitter[2] / side), side * (1 + jitter[3] / side)]
            wrong = r > 0.8
            dets.append(_det(image_id, cat % 3 + 1 if wrong else cat, box, float(rng.uniform(0.05, 1.0))))
            if r < 0.25:  # a duplicate
                dets.append(_det(image_id, cat, [x + 2, y + 2, float(side), float(side)], float(rng.uniform(0.01, 0.5))))
        for _ in range(3):  # background
            x, y, s = (float(v) for v in rng.uniform(0, 150, 3))
            dets.append(_det(image_id, int(rng.integers(1, 4)), [x, y, s / 3 + 5, s / 3 + 5], float(rng.uniform(0, 0.6))))
    return anns, dets


@pytest.fixture(scope="module")
def random_eval() -> COCOeval:
    anns, dets = _random_data()
    return _evaluate(anns, dets, 10)


def _hand_dataset() -> tuple[list[dict], list[dict]]:
    """Image 1: a cat found (0.9). Image 2: a dog detected as a cat (0.8). Image 3: a car missed, a car detected where
    there is none (0.7), a car detection inside a crowd region (0.6, ignored), a low-scoring dog (0.1)."""
    anns = [_ann(1, 1, 1, [10, 10, 40, 40]), _ann(2, 2, 2, [20, 20, 50, 50]), _ann(3, 3, 3, [5, 5, 30, 30]),
            _ann(4, 3, 3, [100, 0, 100, 50], crowd=1)]
    dets = [_det(1, 1, [12, 12, 40, 40], 0.9), _det(2, 1, [22, 20, 50, 50], 0.8), _det(3, 3, [60, 60, 30, 30], 0.7),
            _det(3, 3, [110, 5, 30, 30], 0.6), _det(3, 2, [0, 150, 20, 20], 0.1)]
    return anns, dets


def test_area_under_each_class_pr_curve_is_pycocotools_ap_of_that_class(random_eval: COCOeval) -> None:
    anns, dets = _random_data()
    curves = pr_curves(random_eval)
    assert curves.class_names == ["cat", "dog", "car"] and curves.at_50.shape == (3, 101)
    for k, cat in enumerate((1, 2, 3)):
        alone = _evaluate(anns, dets, 10, catIds=[cat])  # pycocotools' AP of this class on its own
        for row, reference in ((curves.at_50_95[k], alone.stats[0]), (curves.at_50[k], alone.stats[1])):
            assert 0.05 < reference < 0.95
            assert np.trapezoid(row, curves.recall) == pytest.approx(reference, abs=0.01)  # the area as plotted
            assert curve_area(curves.recall, row) == pytest.approx(reference, abs=1e-9)  # COCO's 101-point mean
    # the all-classes curve is pycocotools' AP / AP50
    assert curve_area(curves.recall, curves.at_50_95.mean(0)) == pytest.approx(random_eval.stats[0], abs=1e-9)
    assert curve_area(curves.recall, curves.at_50.mean(0)) == pytest.approx(random_eval.stats[1], abs=1e-9)


def test_threshold_curves_and_best_f1_by_hand() -> None:
    curves = threshold_curves(_evaluate(*_hand_dataset(), 3))
    at = {round(float(t), 3): i for i, t in enumerate(curves.thresholds)}
    # 3 ground truths (the crowd region is not one); the 0.6 car on the crowd region is neither right nor wrong
    assert (curves.precision[at[0.5]], curves.recall[at[0.5]], curves.f1[at[0.5]]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert (curves.precision[at[0.85]], curves.recall[at[0.85]], curves.f1[at[0.85]]) == pytest.approx((1, 1 / 3, 0.5))
    assert (curves.precision[at[0.05]], curves.f1[at[0.05]]) == pytest.approx((1 / 4, 2 / 7))
    assert (curves.precision[at[0.95]], curves.recall[at[0.95]]) == (1.0, 0.0)  # nothing kept: nothing wrong kept
    assert curves.best == pytest.approx((0.801, 0.5))  # from just above the 0.8 wrong-class detection
    np.testing.assert_allclose(curves.per_class_f1[:, at[0.85]], [1.0, 0.0, 0.0])


def test_confusion_matrix_counts_by_hand() -> None:
    coco_eval = _evaluate(*_hand_dataset(), 3)
    gt, dt = coco_eval.cocoGt, coco_eval.cocoDt
    cm = confusion_matrix(gt, dt, [1, 2, 3], [1, 2, 3], iou=0.5, score_threshold=0.5)
    # rows: ground truth cat, dog, car, background; columns: detections cat, dog, car, background
    expected = np.array([
        [1, 0, 0, 0],  # the cat found
        [1, 0, 0, 0],  # the dog detected as a cat
        [0, 0, 0, 1],  # the car missed
        [0, 0, 1, 0],  # the car detected where there is none (the one on the crowd region is ignored)
    ])
    np.testing.assert_array_equal(cm.matrix, expected)
    low = confusion_matrix(gt, dt, [1, 2, 3], [1, 2, 3], iou=0.5, score_threshold=0.05).matrix
    np.testing.assert_array_equal(low - expected, [[0] * 4, [0] * 4, [0] * 4, [0, 1, 0, 0]])  # + the 0.1 dog
    strict = confusion_matrix(gt, dt, [1, 2, 3], [1, 2, 3], iou=0.95, score_threshold=0.5).matrix
    np.testing.assert_array_equal(strict, [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1], [2, 0, 1, 0]])  # nothing matches


def test_a_detection_takes_its_own_class_before_another() -> None:
    """A dog with a dog detection (IoU 0.6) and a better-scoring, better-placed cat detection: the dog detection
    is the match, the cat detection a false positive."""
    coco_eval = _evaluate([_ann(1, 1, 2, [0, 0, 100, 100])],
                          [_det(1, 1, [0, 0, 100, 95], 0.9), _det(1, 2, [0, 0, 100, 60], 0.6)], 1)
    cm = confusion_matrix(coco_eval.cocoGt, coco_eval.cocoDt, [1], [1, 2, 3], score_threshold=0.5).matrix
    assert cm[1, 1] == 1 and cm[3, 0] == 1 and cm.sum() == 2


def test_error_breakdown_c75_c50_loc_are_pycocotools_numbers(random_eval: COCOeval) -> None:
    ap = error_breakdown(random_eval).ap()
    assert ap["C75"] == pytest.approx(random_eval.stats[2], abs=1e-9)  # AP75
    assert ap["C50"] == pytest.approx(random_eval.stats[1], abs=1e-9)  # AP50
    anns, dets = _random_data()
    at_01 = _evaluate(anns, dets, 10, iouThrs=np.array([0.1]))  # pycocotools at IoU 0.1
    precision = at_01.eval["precision"][0, :, :, 0, -1]
    assert ap["Loc"] == pytest.approx(precision[precision > -1].mean(), abs=1e-9)
    assert ap["FN"] == 1.0
    values = [ap[name] for name in ERROR_TYPES]
    assert values == sorted(values) and ap["Oth"] > ap["Loc"]  # each curve forgives more than the one before


def test_error_breakdown_by_hand() -> None:
    """cat: its 0.95 detection is on a dog (same supercategory); dog: its 0.8 detection is on a car (another
    supercategory); car: one of two found, after a 0.85 background detection."""
    anns = [_ann(1, 1, 1, [10, 10, 40, 40]), _ann(2, 2, 2, [20, 20, 50, 50]), _ann(3, 3, 3, [5, 5, 30, 30]),
            _ann(4, 4, 3, [30, 30, 40, 40])]
    dets = [_det(1, 1, [12, 12, 40, 40], 0.9), _det(2, 1, [22, 20, 50, 50], 0.95), _det(2, 2, [20, 22, 50, 50], 0.5),
            _det(3, 2, [5, 6, 30, 30], 0.8), _det(3, 3, [6, 5, 30, 30], 0.4), _det(4, 3, [150, 150, 10, 10], 0.85)]
    coco_eval = _evaluate(anns, dets, 4)
    breakdown = error_breakdown(coco_eval)
    car = 51 / 101 * 0.5  # precision 0.5 up to recall 0.5 (51 of COCO's 101 recall points), then 0
    per_class = {  # C75, C50, Loc, Sim, Oth, BG, FN
        "cat": [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0],
        "dog": [0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0],
        "car": [car, car, car, car, car, 51 / 101, 1.0],
    }
    for name, expected in per_class.items():
        assert [breakdown.per_class_ap()[name][t] for t in ERROR_TYPES] == pytest.approx(expected, abs=1e-9), name
    means = np.mean(list(per_class.values()), axis=0)
    assert list(breakdown.ap().values()) == pytest.approx(means.tolist(), abs=1e-9)
    assert breakdown.ap()["C75"] == pytest.approx(coco_eval.stats[2], abs=1e-9)
    table = format_error_table(breakdown.ap())
    assert "C75" in table and f"{means[3]:.3f}" in table


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 200


def test_detection_plots_are_images_and_their_numbers_are_recorded(random_eval: COCOeval, tmp_path: Path) -> None:
    summary = write_detection_plots(random_eval, tmp_path / "plots")
    assert summary["files"] == ["pr_curve.png", "threshold_curves.png", "confusion_matrix.png", "per_class_ap.png",
                                "error_breakdown.png"]
    for name in summary["files"]:
        _assert_png(tmp_path / "plots" / name)
    threshold, f1 = threshold_curves(random_eval).best
    assert (summary["best_f1_threshold"], summary["best_f1"]) == pytest.approx((threshold, f1), abs=1e-6)
    assert summary["error_breakdown"]["C50"] == pytest.approx(random_eval.stats[1], abs=1e-6)
    record = json.loads((tmp_path / "plots" / "plots.json").read_text())
    assert record["confusion_matrix"]["score_threshold"] == threshold
    assert np.asarray(record["confusion_matrix"]["counts"]).shape == (4, 4)
    assert record["per_class"]["AP"]["dog"] == pytest.approx(pr_curves(random_eval).ap(pr_curves(random_eval).at_50_95)[1], abs=1e-6)
    line = plots_line({"plots": summary})
    assert str(tmp_path / "plots") in line and f"predict.score_threshold={threshold:g}" in line


def test_segmentation_numbers_of_a_tiny_confusion_matrix() -> None:
    confusion = np.array([[5, 1, 0], [2, 6, 2], [0, 0, 0]])
    np.testing.assert_allclose(row_normalized(confusion), [[5 / 6, 1 / 6, 0], [0.2, 0.6, 0.2], [0, 0, 0]])
    iou = class_iou(confusion)
    np.testing.assert_allclose(iou[:2], [5 / 8, 6 / 11])
    assert iou[2] == 0.0  # predicted twice, never labelled
    assert np.isnan(class_iou(np.array([[3, 0], [0, 0]]))[1])  # neither labelled nor predicted
    errors = error_map(np.array([[0, 1], [255, 2]]), np.array([[0, 2], [1, 2]]), ignore_index=255)
    np.testing.assert_array_equal(errors, [[0, 1], [-1, 0]])


def test_segmentation_ious_equal_the_evaluators(tmp_path: Path) -> None:
    from densekit.evaluation.cityscapes import CityscapesEvaluator

    rng = np.random.default_rng(0)
    label = torch.from_numpy(rng.integers(0, 3, (40, 60)))
    label[:3] = 255
    pred = torch.where(torch.from_numpy(rng.random((40, 60))) < 0.7, label.clamp(max=2), torch.from_numpy(rng.integers(0, 3, (40, 60))))
    evaluator = CityscapesEvaluator(3, 255, class_names=["ground", "block", "disc"])
    evaluator.update([{"sem_seg": pred}], [{"sem_seg": label}])
    metrics = evaluator.evaluate()
    np.testing.assert_allclose(class_iou(evaluator.confusion_matrix.numpy()), list(metrics["per_class_iou"].values()))

    image = (rng.random((40, 60, 3)) * 255).astype(np.uint8)
    samples = [SegSample("a", image, label.numpy(), pred.numpy()), SegSample("b", image[::2, ::2], label.numpy(), pred.numpy())]
    summary = write_segmentation_plots(evaluator.confusion_matrix.numpy(), evaluator.class_names, tmp_path, samples)
    assert summary["files"] == ["confusion_matrix.png", "per_class_iou.png", "samples.png"]
    for name in summary["files"]:
        _assert_png(tmp_path / name)
    assert json.loads((tmp_path / "plots.json").read_text())["iou"]["block"] == pytest.approx(metrics["per_class_iou"]["block"], abs=1e-6)
    assert plots_line({"plots": summary}) == f"plots: {tmp_path}"


def test_training_curves_from_metrics_json(tmp_path: Path) -> None:
    record = {
        "train": [{"step": s, "loss": 2.0 / s, "class_loss": 1.0 / s, "box_loss": 1.0 / s, "lr": 0.01 * s} for s in (1, 2, 3)]
        + [{"step": 3, "loss": 0.5, "class_loss": 0.25, "box_loss": 0.25, "lr": 0.03}],  # a resumed run logs step 3 again
        "history": [{"step": 2, "epoch": 1, "AP": 0.1}, {"step": 3, "epoch": 2, "AP": 0.2, "AP50": 0.4}],
    }
    curves = training_curves(record)
    np.testing.assert_array_equal(curves.steps, [1, 2, 3])
    assert list(curves.losses) == ["loss", "box_loss", "class_loss"]
    np.testing.assert_allclose(curves.losses["loss"], [2.0, 1.0, 0.5])
    np.testing.assert_allclose(curves.lr, [0.01, 0.02, 0.03])
    assert curves.metric_name == "AP" and curves.metric.tolist() == [0.1, 0.2]
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    _assert_png(write_training_plot(tmp_path / "metrics.json", tmp_path / "plots"))
    (tmp_path / "empty.json").write_text(json.dumps({"history": []}))
    assert write_training_plot(tmp_path / "empty.json", tmp_path / "none") is None
    assert plot_training_run(tmp_path / "no_run") is None  # no metrics.json: the final evaluation failed first


def test_only_the_final_evaluation_of_training_plots(tmp_path: Path) -> None:
    """Periodic evaluations call ``evaluate(model)``, the final one ``evaluate.final(model)``; metrics.json records
    the logged losses and the run ends with plots/training.png."""
    import densekit
    from densekit.config import TrainConfig
    from densekit.engine.trainer import Trainer
    from densekit.evaluation.loop import Evaluation

    torch.manual_seed(0)
    model = densekit.create_model("efficientdet_d0", num_classes=2, image_size=[64, 64], neck={"repeats": 1, "channels": 16},
                                  head={"repeats": 1})
    images = torch.rand(4, 3, 64, 64)
    batches = [(images[i : i + 2], [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([i % 2])}] * 2)
               for i in (0, 2)]
    calls: list[bool] = []

    def run(_: torch.nn.Module, plots: bool) -> dict:
        calls.append(plots)
        return {"AP": 0.1 * len(calls)}

    cfg = TrainConfig(batch_size=2, max_steps=4, lr=0.01, warmup_epochs=0.0, checkpoint_every=4, ema_decay=0.0,
                      log_every=1, num_workers=0, eval_every_epochs=1, freeze_at=0)
    Trainer(model, batches, cfg, tmp_path, torch.device("cpu"), Evaluation(run, plots=True)).train()
    assert calls == [False, True]  # the periodic evaluation at the end of epoch 1, then the final one
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["step"] for e in record["train"]] == [1, 2, 3, 4]
    assert {"loss", "lr"} <= set(record["train"][0]) and len(record["train"][0]) > 3  # and the loss terms
    _assert_png(tmp_path / "plots" / "training.png")
