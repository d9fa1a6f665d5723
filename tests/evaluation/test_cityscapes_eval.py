"""CityscapesEvaluator against cityscapesscripts' own evalPixelLevelSemanticLabeling on the same predictions.

Ground truth is a tiny real-layout dataset (labelIds / instanceIds rasterised by cityscapesscripts, trainIds made by
its createTrainIdLabelImgs). Predictions are the ground truth with random errors, some at half resolution; the
evaluator scores them from trainIds, :func:`write_predictions` writes them as labelId PNGs, and the official
script, run in-process on those files, must give the same confusion matrix, class IoUs and mean.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
from cityscapesscripts.helpers.labels import name2label

from densekit.data.cityscapes import CITYSCAPES_CLASSES, CityscapesSegmentation
from densekit.data.synthetic_cityscapes import ensure_synthetic_cityscapes
from densekit.evaluation.cityscapes import (
    CityscapesEvaluator,
    colorize,
    format_cityscapes_table,
    write_predictions,
)

SIZE = (64, 128)


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic_cityscapes(tmp_path_factory.mktemp("cityscapes"), num_train=0, num_val=4, size=SIZE)


def _predictions(ds: CityscapesSegmentation) -> tuple[list[dict], list[dict]]:
    """Imperfect predictions: ground truth with random pixels, a shifted block and guessed ignore pixels wrong.

    Errors only use trainIds 0-15, so 'train', 'motorcycle' and 'bicycle' are absent and never predicted (NaN).
    Odd images are predicted at half resolution, as a model fed a resized input would.
    """
    rng = np.random.default_rng(0)
    outputs, targets = [], []
    for i in range(len(ds)):
        _, target = ds[i]
        gt = target["sem_seg"].numpy()
        pred = np.where(gt == 255, rng.integers(0, 16, gt.shape), gt)
        noise = rng.random(gt.shape) < 0.2
        pred[noise] = rng.integers(0, 16, int(noise.sum()))
        pred[10:30, 20:60] = np.roll(pred, 7, axis=1)[10:30, 20:60]
        if i % 2:
            pred = cv2.resize(pred.astype(np.uint8), (SIZE[1] // 2, SIZE[0] // 2), interpolation=cv2.INTER_NEAREST)
        outputs.append({"sem_seg": torch.as_tensor(pred, dtype=torch.int64)})
        targets.append(target)
    return outputs, targets


def _official(cs_root: Path, results: Path, instance_level: bool = False) -> dict:
    """cityscapesscripts' evaluation of the val ground truth against the PNGs under ``results``.

    Its instance-level path calls ``np.in1d``, which numpy 2.4 removed: run it with ``np.isin`` (the same function
    under its current name, patched in by the test that asks for it).
    """
    args = copy.copy(cs_eval.args)  # the module keeps its settings in a global; leave that untouched
    args.quiet = True
    args.JSONOutput = False  # it would write under CITYSCAPES_DATASET/evaluationResults otherwise
    args.colorized = False
    args.evalInstLevelScore = instance_level
    args.predictionPath = str(results)  # what getPrediction would take from CITYSCAPES_RESULTS
    args.predictionWalk = None
    ground_truth = sorted(str(p) for p in (cs_root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    predictions = [cs_eval.getPrediction(args, gt) for gt in ground_truth]
    with contextlib.redirect_stdout(io.StringIO()):  # quiet=True still prints a few lines
        return cs_eval.evaluateImgLists(predictions, ground_truth, args)


def test_miou_equals_cityscapesscripts(cs_root: Path, tmp_path: Path) -> None:
    ds = CityscapesSegmentation(cs_root, "val")
    outputs, targets = _predictions(ds)
    ev = CityscapesEvaluator()
    ev.update(outputs, targets)
    ours = ev.evaluate()
    written = ev.write_predictions(outputs, targets, tmp_path / "results")
    assert [p.name for p in written] == [Path(t["file"]).name for t in targets]
    official = _official(cs_root, tmp_path / "results")

    # Same confusion matrix: the official one over labelIds, rows and columns of the 19 evaluated classes...
    label_ids = [name2label[n].id for n in CITYSCAPES_CLASSES]
    conf = np.asarray(official["confMatrix"], dtype=np.int64)
    np.testing.assert_array_equal(conf[np.ix_(label_ids, label_ids)], ev.confusion_matrix.numpy())
    # ...and predictions only ever in those columns.
    assert conf[label_ids].sum() == conf[np.ix_(label_ids, label_ids)].sum()

    for name in CITYSCAPES_CLASSES:
        theirs = official["classScores"][name]
        if name in ("train", "motorcycle", "bicycle"):
            assert math.isnan(theirs) and math.isnan(ours["per_class_iou"][name])
        else:
            assert ours["per_class_iou"][name] == pytest.approx(theirs, abs=1e-12), name
    assert ours["mIoU"] == pytest.approx(official["averageScoreClasses"], abs=1e-12)
    assert 0.2 < ours["mIoU"] < 0.9  # imperfect, far from trivial
    # Category IoUs (7 categories; "void" has no evaluated class: NaN on both sides and out of the mean).
    assert set(ours["per_category_iou"]) | {"void"} == set(official["categoryScores"])
    for category, theirs in official["categoryScores"].items():
        if category == "void":
            assert math.isnan(theirs)
        else:
            assert ours["per_category_iou"][category] == pytest.approx(theirs, abs=1e-12), category
    assert ours["mIoU_category"] == pytest.approx(official["averageScoreCategories"], abs=1e-12)
    assert ours["mIoU_category"] > ours["mIoU"]  # confusions inside a category (car/truck...) stop counting
    tp = np.diag(conf)[label_ids].sum()
    assert ours["pixel_acc"] == pytest.approx(tp / conf[label_ids].sum(), abs=1e-12)


def test_instance_level_iiou_equals_cityscapesscripts(cs_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(np, "in1d", np.isin, raising=False)  # see _official
    ds = CityscapesSegmentation(cs_root, "val")
    outputs, targets = _predictions(ds)
    ev = CityscapesEvaluator()
    ev.update(outputs, targets)
    ours = ev.evaluate()
    ev.write_predictions(outputs, targets, tmp_path / "results")
    official = _official(cs_root, tmp_path / "results", instance_level=True)

    instance_classes = [n for n in CITYSCAPES_CLASSES if name2label[n].hasInstances]
    assert len(instance_classes) == 8
    compared = 0
    for name in CITYSCAPES_CLASSES:
        theirs, mine = official["classInstScores"][name], ours["per_class_iiou"][name]
        if math.isnan(theirs):
            assert math.isnan(mine), name
        else:
            assert mine == pytest.approx(theirs, rel=1e-12), name
            compared += 1
    assert compared >= 2  # the synthetic scenes hold people and cars, imperfectly predicted
    assert ours["iIoU"] == pytest.approx(official["averageScoreInstClasses"], rel=1e-12)
    for category, theirs in official["categoryInstScores"].items():
        mine = ours["per_category_iiou"].get(category, math.nan)
        assert (math.isnan(theirs) and math.isnan(mine)) or mine == pytest.approx(theirs, rel=1e-12), category
    assert ours["iIoU_category"] == pytest.approx(official["averageScoreInstCategories"], rel=1e-12)
    assert 0.0 < ours["iIoU"] < 1.0


def test_iiou_is_left_out_when_an_instance_file_is_missing(cs_root: Path, tmp_path: Path) -> None:
    ds = CityscapesSegmentation(cs_root, "val")
    outputs, targets = _predictions(ds)
    ev = CityscapesEvaluator()
    ev.update(outputs[:1], targets[:1])
    assert "iIoU" in ev.evaluate()
    moved = dict(targets[1], label_file=str(tmp_path / "elsewhere_gtFine_labelTrainIds.png"))
    ev.update(outputs[1:2], [moved])
    metrics = ev.evaluate()
    assert "iIoU" not in metrics and not math.isnan(metrics["mIoU"])  # the pixel-level scores stay


def test_confusion_counts_by_hand() -> None:
    gt = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1], [2, 2]])  # half resolution: each value covers a 2x2 block
    ev = CityscapesEvaluator()
    ev.update([{"sem_seg": pred}], [{"sem_seg": gt}])
    conf = ev.confusion_matrix
    assert conf.sum() == 12  # ignore pixels skipped
    assert conf[0, 0] == 4 and conf[1, 1] == 4 and conf[2, 2] == 4
    metrics = ev.evaluate()
    assert metrics["mIoU"] == 1.0 and metrics["pixel_acc"] == 1.0
    assert metrics["per_class_iou"]["road"] == 1.0 and math.isnan(metrics["per_class_iou"]["sky"])
    # road predicted on sidewalk: road IoU 4 / (4 + 4), sidewalk 0 / 4.
    ev.reset()
    ev.update([{"sem_seg": torch.zeros(4, 4, dtype=torch.int64)}], [{"sem_seg": gt}])
    metrics = ev.evaluate()
    assert metrics["per_class_iou"]["road"] == pytest.approx(4 / 12)
    assert metrics["per_class_iou"]["sidewalk"] == 0.0 and metrics["per_class_iou"]["building"] == 0.0
    assert metrics["mIoU"] == pytest.approx(4 / 36) and metrics["pixel_acc"] == pytest.approx(4 / 12)


def test_repeated_file_counts_once_and_bad_values_raise() -> None:
    gt = torch.zeros(4, 4, dtype=torch.int64)
    ev = CityscapesEvaluator()
    for _ in range(3):
        ev.update([{"sem_seg": gt}], [{"sem_seg": gt, "file": "a_000000_000019_leftImg8bit.png"}])
    assert ev.confusion_matrix.sum() == 16
    with pytest.raises(ValueError, match="predictions must be in"):
        ev.update([{"sem_seg": gt + 19}], [{"sem_seg": gt}])
    with pytest.raises(ValueError, match="label values"):
        ev.update([{"sem_seg": gt}], [{"sem_seg": gt + 30}])
    with pytest.raises(ValueError, match="test split"):
        ev.update([{"sem_seg": gt}], [{"sem_seg": None, "file": "x.png"}])
    assert math.isnan(CityscapesEvaluator().evaluate()["mIoU"])


def test_write_predictions_labelids_full_resolution(tmp_path: Path) -> None:
    pred = torch.tensor([[0, 13], [10, 18]])
    target = {"file": "/data/leftImg8bit/val/x/x_000001_000019_leftImg8bit.png", "orig_size": (4, 6)}
    (path,) = write_predictions([{"sem_seg": pred}], [target], tmp_path / "out")
    assert path == tmp_path / "out" / "x_000001_000019_leftImg8bit.png"
    written = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert written.dtype == np.uint8 and written.shape == (4, 6)
    expected = np.array([[7, 26], [23, 33]])  # road, car, sky, bicycle labelIds
    np.testing.assert_array_equal(written, np.repeat(np.repeat(expected, 2, 0), 3, 1))
    assert [p.name for p in (tmp_path / "out").iterdir()] == [path.name]  # no temp files left
    with pytest.raises(ValueError, match="classes 0-18"):
        write_predictions([{"sem_seg": pred + 255}], [target], tmp_path / "out")


def test_colorize_uses_official_colours() -> None:
    rgb = colorize(torch.tensor([[0, 13, 255]]))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 3, 3)
    assert rgb[0].tolist() == [[128, 64, 128], [0, 0, 142], [0, 0, 0]]


def test_table_fits_one_screen() -> None:
    metrics = {"mIoU": 0.5, "pixel_acc": 0.9, "per_class_iou": {n: 0.5 for n in CITYSCAPES_CLASSES}}
    metrics["per_class_iou"]["train"] = math.nan
    table = format_cityscapes_table(metrics)
    lines = table.splitlines()
    assert len(lines) <= 24 and max(map(len, lines)) <= 80
    assert "mIoU 0.500" in lines[0] and "n/a" in table
    assert all(n[:14] in table for n in CITYSCAPES_CLASSES)


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str, payload: str) -> None:
    # As DataLoader workers do: the OpenMP pool the parent used before the fork does not survive it.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        outputs, targets = torch.load(payload)
        # Rank 0 gets images 0-2, rank 1 images 2-3: image 2 repeated, as DistributedSampler pads.
        part = slice(0, 3) if rank == 0 else slice(2, 4)
        ev = CityscapesEvaluator()
        ev.update(outputs[part], targets[part])
        metrics = ev.evaluate()  # synchronises itself
        Path(out_dir, f"{rank}.json").write_text(json.dumps({"metrics": metrics, "conf": ev.confusion_matrix.tolist()}))
    finally:
        dist.destroy_process_group()


def test_distributed_matches_single_process(cs_root: Path, tmp_path: Path, run_workers) -> None:
    outputs, targets = _predictions(CityscapesSegmentation(cs_root, "val"))
    single = CityscapesEvaluator()
    single.update(outputs, targets)
    expected = single.evaluate()
    torch.save((outputs, targets), tmp_path / "payload.pt")
    run_workers(_distributed_worker, (2, str(tmp_path / "init"), str(tmp_path), str(tmp_path / "payload.pt")))
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["conf"] == single.confusion_matrix.tolist()
        assert got["metrics"]["mIoU"] == pytest.approx(expected["mIoU"])
        assert got["metrics"]["per_class_iou"] == pytest.approx(expected["per_class_iou"], nan_ok=True)
