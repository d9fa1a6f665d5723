"""The evaluation loops beside their evaluators: a model run over a loader (:func:`run_inference`), detection (COCO
metrics or a test-dev submission) and segmentation (Cityscapes mIoU, labelId PNGs), with pictures."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.checks import SKIPPED, is_skipped
from ..data.decode import read_image
from ..engine import distributed as dist_utils
from ..utils.visualize import draw_detections, save_image
from .cityscapes import CityscapesEvaluator, colorize, format_cityscapes_table, write_predictions
from .coco import CocoEvaluator, format_coco_table, write_results_json, write_test_dev_submission
from .plots import PLOTS_DIR

log = logging.getLogger(__name__)


class Evaluation:
    """A task's evaluation (``Task.make_evaluate``): ``evaluate(model)`` scores without plots (the periodic
    evaluations of a training run: cheap); ``evaluate.final(model)`` scores and, with ``plots`` (``eval.plots``),
    writes the plots too (``densekit eval`` and the final evaluation of a training run).

    Args:
        run: ``run(model, plots) -> metrics``.
        plots: Whether :meth:`final` writes the plots.
    """

    def __init__(self, run: Callable[[nn.Module, bool], dict[str, Any]], plots: bool) -> None:
        self.run, self.plots = run, plots

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        return self.run(model, False)

    def final(self, model: nn.Module) -> dict[str, Any]:
        return self.run(model, self.plots)


def _plots_failed(error: Exception, out_dir: Path) -> None:
    """The plots are an extra: a failure to draw them is logged, the metrics are kept."""
    log.warning("could not write the plots in %s: %s: %s", out_dir, type(error).__name__, error)


class Evaluator(Protocol):
    def update(self, outputs: list[dict[str, torch.Tensor]], targets: list[dict[str, Any]]) -> None: ...

    def evaluate(self) -> dict[str, Any]: ...


class SkippedImages:
    """The unreadable images an evaluation leaves out: with ``data.skip_unreadable=true`` a dataset returns a
    placeholder item for each (:func:`densekit.data.checks.is_skipped`). :meth:`take` removes them from every batch
    before the model sees it, so they are neither predicted nor scored (COCOeval scores the images it was given
    detections for, the confusion matrix counts the pixels it was given); :meth:`report` logs them once."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}  # image file -> why it was not read

    def take(self, images: torch.Tensor, targets: list[dict[str, Any]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """The batch without its placeholders (no targets left: a batch of unreadable images only)."""
        keep = [i for i, target in enumerate(targets) if not is_skipped(target)]
        if len(keep) == len(targets):
            return images, targets
        self.reasons.update({str(t.get("file")): str(t[SKIPPED]) for t in targets if is_skipped(t)})
        return images[keep], [targets[i] for i in keep]

    def report(self, split: str, total: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Warn once (main process) with the count and names of the images left out (every rank's: collective under
        torch.distributed); ``metrics`` plus ``skipped_images`` (count) and ``skipped_files`` when there are any."""
        reasons = dict(self.reasons)
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, reasons)
            reasons = {file: why for part in gathered for file, why in part.items()}
        if not reasons:
            return metrics
        if dist_utils.is_main_process():
            listed = "\n".join(f"  {why}" for why in list(reasons.values())[:10])
            more = f"\n  ... and {len(reasons) - 10} more" if len(reasons) > 10 else ""
            log.warning("eval %s: %d of %d images cannot be read and were not evaluated (data.skip_unreadable=true); "
                        "the metrics are over the other %d:\n%s%s", split, len(reasons), total,
                        total - len(reasons), listed, more)
        return {**metrics, "skipped_images": len(reasons), "skipped_files": sorted(reasons)}


@torch.inference_mode()
def run_inference(
    model: nn.Module,
    loader: Iterable,
    evaluator: Evaluator,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    desc: str = "eval",
    skipped: SkippedImages | None = None,
) -> dict[str, Any]:
    """Feed every batch through ``model`` in eval mode and return ``evaluator.evaluate()``; the placeholders of
    unreadable images are left out and recorded in ``skipped`` (see :class:`SkippedImages`)."""
    skipped = SkippedImages() if skipped is None else skipped
    was_training = model.training
    model.eval()
    for images, targets in tqdm(loader, desc=desc, dynamic_ncols=True, leave=False):
        images, targets = skipped.take(images, targets)
        if not targets:
            continue
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images.to(device, non_blocking=True))
        outputs = [{k: v.float() if v.is_floating_point() else v for k, v in o.items()} for o in outputs]
        evaluator.update(outputs, targets)
    model.train(was_training)
    return evaluator.evaluate()


def evaluate_detector(
    model: nn.Module,
    dataset: Any,
    loader: Any,
    device: torch.device,
    output_dir: str | Path,
    split: str,
    model_name: str,
    label_map: list[int],
    score_threshold: float = 0.001,
    visualize: int = 0,
    plots: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on a COCO-format ``dataset`` (collective under torch.distributed).

    Writes ``detections_<split>.json`` (COCO results: original ids, xywh in original pixels) and, for a split
    without annotations (test-dev), the evaluation-server json + zip instead of metrics. ``label_map`` maps model
    labels to the dataset's category ids. Returns the metrics (empty for test-dev); the main process also prints the
    COCO table. Images the dataset could not read (``data.skip_unreadable``) are left out and not scored: the
    metrics then hold their count and names (``skipped_images``, ``skipped_files``; see :class:`SkippedImages`).
    With ``plots`` (main process, a split with annotations), the detection plots go to ``<output_dir>/plots/``
    (:func:`densekit.evaluation.plots.write_detection_plots`) and the metrics get ``plots`` (their folder, the
    best-F1 score threshold, the COCO error breakdown).
    """
    output_dir = Path(output_dir)
    in_dataset = [c in dataset.coco.cats for c in label_map]  # labels the dataset has a category for
    class_names = [
        dataset.coco.cats[c]["name"] if known else f"label {i} (not in the dataset)"
        for i, (c, known) in enumerate(zip(label_map, in_dataset))
    ]
    evaluator = CocoEvaluator(dataset.coco, label_map, class_names, score_threshold=score_threshold)
    has_annotations = len(dataset.coco.getAnnIds()) > 0
    skipped = SkippedImages()
    with restrict_labels(model, in_dataset):
        if has_annotations:  # COCOeval scores the images evaluated (params.imgIds): not the skipped ones
            metrics = run_inference(model, loader, evaluator, device, desc=f"eval {split}", skipped=skipped)
        else:
            run_inference(model, loader, _Collect(evaluator), device, desc=f"predict {split}", skipped=skipped)
            metrics = {}
    if dist_utils.is_main_process():
        results = evaluator.results()
        write_results_json(results, output_dir / f"detections_{split}.json")
        if has_annotations:
            print(format_coco_table(metrics))
            if plots:
                metrics = _detection_plots(evaluator, metrics, output_dir / PLOTS_DIR)
        else:
            # The evaluation server splits file names on "_": the algorithm name must not contain one.
            json_path, zip_path = write_test_dev_submission(results, output_dir, model_name.replace("_", "-"))
            print(f"{len(results)} detections on {len(evaluator.image_ids)} images -> {zip_path} (upload this)")
        if visualize:
            with restrict_labels(model, in_dataset):
                save_visualizations(model, dataset, visualize, output_dir / "vis", device, class_names)
    return skipped.report(split, len(dataset), metrics)


def _detection_plots(evaluator: CocoEvaluator, metrics: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """``metrics`` with ``plots`` after writing them (and printing the error breakdown); unchanged without any
    detection to plot."""
    from .plots import write_detection_plots
    from .plots.error_analysis import format_error_table

    if evaluator.coco_eval is None:
        log.info("no detections: no plots")
        return metrics
    try:
        summary = write_detection_plots(evaluator.coco_eval, out_dir)
    except Exception as error:  # noqa: BLE001 - drawing must not lose the metrics
        _plots_failed(error, out_dir)
        return metrics
    print(format_error_table(summary["error_breakdown"]))
    return {**metrics, "plots": summary}


@contextlib.contextmanager
def restrict_labels(model: nn.Module, allowed: list[bool]) -> Iterator[None]:
    """Within the block, ``model`` detects only the labels marked ``allowed`` (all of them: no change).

    The masked labels are removed before each image's best ``max_detections`` are kept, so they take no place
    there (a 90-class COCO head scored on COCO's 80 categories keeps 100 detections of those 80).
    """
    postprocessor = getattr(model, "postprocessor", None)
    if all(allowed) or postprocessor is None:
        yield
        return
    previous = postprocessor.label_mask
    postprocessor.label_mask = torch.tensor(allowed, dtype=torch.bool)
    try:
        yield
    finally:
        postprocessor.label_mask = previous


class _Collect:
    """Evaluator adapter for splits without ground truth: gathers results, computes nothing."""

    def __init__(self, evaluator: CocoEvaluator) -> None:
        self.evaluator = evaluator

    def update(self, outputs, targets) -> None:
        self.evaluator.update(outputs, targets)

    def evaluate(self) -> dict[str, Any]:
        self.evaluator.synchronize()
        return {}


@torch.inference_mode()
def save_visualizations(model: nn.Module, dataset: Any, count: int, out_dir: Path, device: torch.device, class_names: list[str]) -> None:
    """Draw the predictions for the first ``count`` images on the original photos."""
    was_training = model.training
    model.eval()
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        if is_skipped(target):  # unreadable (data.skip_unreadable): nothing to draw on
            continue
        det = model(image[None].to(device))[0]
        boxes = (det["boxes"].cpu().numpy() / float(target["scale"])).astype(np.float32)
        original = read_image(dataset.image_path(index), exif=getattr(dataset, "exif", True))
        drawn = draw_detections(original, boxes, det["scores"].cpu().numpy(), det["labels"].cpu().numpy(), class_names)
        save_image(out_dir / f"{int(target['image_id'])}.jpg", drawn)
    model.train(was_training)
    log.info("saved %d pictures with predictions to %s", min(count, len(dataset)), out_dir)


@torch.inference_mode()
def predict_segmentation(model: nn.Module, images: torch.Tensor, scales: tuple[float, ...] = (1.0,), flip: bool = False) -> list[torch.Tensor]:
    """Argmax trainId maps ``[H, W]`` per image; with several scales and/or flip, softmax scores are averaged."""
    if tuple(scales) == (1.0,) and not flip:
        return [o["sem_seg"] for o in model(images)]
    h, w = images.shape[-2:]
    total = 0.0
    for scale in scales:
        x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            logits = model.forward_raw(x.flip(-1) if flipped else x)
            logits = logits.flip(-1) if flipped else logits
            total = total + F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).softmax(1)
    return list(total.argmax(1))


def evaluate_segmenter(
    model: nn.Module,
    dataset: Any,
    loader: Any,
    device: torch.device,
    output_dir: str | Path,
    split: str,
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
    write_pngs: bool = False,
    visualize: int = 0,
    plots: bool = False,
) -> dict[str, Any]:
    """Segmentation evaluation (collective under torch.distributed): mIoU over the dataset's classes and per-class
    IoU (and for Cityscapes its category and instance-level scores).

    For a split without labels (test) only label PNGs (in the dataset's own encoding) are written (``<output_dir>/pred_<split>/``, the format of
    cityscapesscripts' evaluation and the benchmark server); with ``write_pngs`` they are written for any split.
    Images the dataset could not read (``data.skip_unreadable``) are left out of the confusion matrix: the metrics
    then hold their count and names (``skipped_images``, ``skipped_files``; see :class:`SkippedImages`).
    With ``plots`` (main process, a split with labels), the segmentation plots go to ``<output_dir>/plots/``
    (:func:`densekit.evaluation.plots.write_segmentation_plots`) and the metrics get ``plots`` (their folder).
    """
    output_dir = Path(output_dir)
    evaluator = CityscapesEvaluator(model.num_classes, model.ignore_index, class_names=dataset.class_names)
    pred_dir = output_dir / f"pred_{split}"
    skipped = SkippedImages()
    was_training = model.training
    model.eval()
    for images, targets in tqdm(loader, desc=f"eval {split}", dynamic_ncols=True, leave=False):
        images, targets = skipped.take(images, targets)  # unreadable images: not in the confusion matrix
        if not targets:
            continue
        preds = predict_segmentation(model, images.to(device), tuple(scales), flip)
        outputs = [{"sem_seg": p[: t["size"][0], : t["size"][1]]} for p, t in zip(preds, targets)]
        if dataset.has_labels:
            evaluator.update(outputs, targets)
        if write_pngs or not dataset.has_labels:
            write_predictions(outputs, targets, pred_dir, label_ids=dataset.label_ids)
    model.train(was_training)
    metrics: dict[str, Any] = {}
    if dataset.has_labels:
        evaluator.synchronize()
        metrics = evaluator.evaluate()
    if dist_utils.is_main_process():
        if metrics:
            print(format_cityscapes_table(metrics))
            if plots:
                samples = segmentation_samples(model, dataset, SEG_SAMPLES, device, tuple(scales), flip)
                metrics = _segmentation_plots(evaluator, metrics, samples, output_dir / PLOTS_DIR)
        if write_pngs or not dataset.has_labels:
            print(f"predicted label PNGs in {pred_dir}")
        if visualize:
            save_segmentation_pictures(model, dataset, visualize, output_dir / "vis", device)
    return skipped.report(split, len(dataset), metrics)


#: How many validation images ``samples.png`` shows.
SEG_SAMPLES = 4


@torch.inference_mode()
def segmentation_samples(
    model: nn.Module, dataset: Any, count: int, device: torch.device, scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
) -> list[Any]:
    """The first ``count`` readable, labelled images of ``dataset`` with the model's prediction, as scored
    (:class:`densekit.evaluation.plots.segmentation.SegSample`)."""
    from .plots.segmentation import SegSample

    was_training = model.training
    model.eval()
    samples = []
    for index in range(len(dataset)):
        if len(samples) >= count:
            break
        image, target = dataset[index]
        if is_skipped(target) or target.get("sem_seg") is None:
            continue
        h, w = target["size"]
        pred = predict_segmentation(model, image[None].to(device), scales, flip)[0][:h, :w]
        rgb = (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        samples.append(SegSample(Path(target["file"]).stem, rgb, target["sem_seg"].numpy(), pred.cpu().numpy()))
    model.train(was_training)
    return samples


def _segmentation_plots(
    evaluator: CityscapesEvaluator, metrics: dict[str, Any], samples: list[Any], out_dir: Path,
) -> dict[str, Any]:
    """``metrics`` with ``plots`` after writing them."""
    from .plots import write_segmentation_plots

    try:
        summary = write_segmentation_plots(evaluator.confusion_matrix.numpy(), evaluator.class_names, out_dir, samples,
                                           evaluator.ignore_index)
    except Exception as error:  # noqa: BLE001 - drawing must not lose the metrics
        _plots_failed(error, out_dir)
        return metrics
    return {**metrics, "plots": summary}


@torch.inference_mode()
def save_segmentation_pictures(model: nn.Module, dataset: Any, count: int, out_dir: Path, device: torch.device) -> None:
    """Image | colour-coded prediction | colour-coded ground truth (when there is one), side by side."""
    was_training = model.training
    model.eval()
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        if is_skipped(target):  # unreadable (data.skip_unreadable): nothing to draw on
            continue
        pred = model(image[None].to(device))[0]["sem_seg"].cpu()
        rgb = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        panels = [rgb, colorize(pred)]
        if target.get("sem_seg") is not None:
            panels.append(colorize(target["sem_seg"]))
        save_image(out_dir / f"{Path(target['file']).stem}.jpg", cv2.cvtColor(np.hstack(panels), cv2.COLOR_RGB2BGR))
    model.train(was_training)
    log.info("saved %d segmentation pictures to %s", min(count, len(dataset)), out_dir)
