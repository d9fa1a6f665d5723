"""Detection evaluation as the tools run it: inference, COCO metrics or a test-dev submission, pictures."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.build import label_map_for_model
from ..data.coco import read_image
from ..evaluation.coco import CocoEvaluator, format_coco_table, write_results_json, write_test_dev_submission
from ..utils.visualize import draw_detections, save_image
from . import distributed as dist_utils
from .inference import run_inference

log = logging.getLogger(__name__)


def evaluate_detector(
    model: nn.Module,
    dataset: Any,
    loader: Any,
    device: torch.device,
    output_dir: str | Path,
    split: str,
    model_name: str,
    score_threshold: float = 0.001,
    visualize: int = 0,
) -> dict[str, Any]:
    """Evaluate ``model`` on a COCO-format ``dataset`` (collective under torch.distributed).

    Writes ``detections_<split>.json`` (COCO results: original ids, xywh in original pixels) and, for a split
    without annotations (test-dev), the evaluation-server json + zip instead of metrics. Returns the metrics
    (empty for test-dev); the main process also prints the COCO table.
    """
    output_dir = Path(output_dir)
    label_map = label_map_for_model(dataset, model.num_classes)
    class_names = [dataset.coco.cats[c]["name"] if c in dataset.coco.cats else str(c) for c in label_map]
    evaluator = CocoEvaluator(dataset.coco, label_map, class_names, score_threshold=score_threshold)
    has_annotations = len(dataset.coco.getAnnIds()) > 0
    if has_annotations:
        metrics = run_inference(model, loader, evaluator, device, desc=f"eval {split}")
    else:
        run_inference(model, loader, _Collect(evaluator), device, desc=f"predict {split}")
        metrics = {}
    if dist_utils.is_main_process():
        results = evaluator.results()
        write_results_json(results, output_dir / f"detections_{split}.json")
        if has_annotations:
            print(format_coco_table(metrics))
        else:
            # The evaluation server splits file names on "_": the algorithm name must not contain one.
            json_path, zip_path = write_test_dev_submission(results, output_dir, model_name.replace("_", "-"))
            print(f"{len(results)} detections on {len(evaluator.image_ids)} images -> {zip_path} (upload this)")
        if visualize:
            save_visualizations(model, dataset, visualize, output_dir / "vis", device, class_names)
    return metrics


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
        det = model(image[None].to(device))[0]
        boxes = (det["boxes"].cpu().numpy() / float(target["scale"])).astype(np.float32)
        original = read_image(dataset.image_path(index))
        drawn = draw_detections(original, boxes, det["scores"].cpu().numpy(), det["labels"].cpu().numpy(), class_names)
        save_image(out_dir / f"{int(target['image_id'])}.jpg", drawn)
    model.train(was_training)
    log.info("saved %d pictures with predictions to %s", min(count, len(dataset)), out_dir)
