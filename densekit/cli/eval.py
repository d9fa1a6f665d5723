"""Evaluate a detector: ``densekit eval model=efficientdet_d0 data=coco data.split=val weights=...`` (``python
tools/eval.py`` in a checkout).

Segmentation: ``model=eseg_lite_s data=cityscapes weights=...`` prints mIoU and per-class IoU (``data.eval_scales``,
``data.eval_flip``; ``data.split=test`` or ``data.write_predictions=true`` writes labelId PNGs).
``eval.precision=int8`` (calibrated on ``eval.calibration_images`` train-split images) or ``bf16`` scores the
network in that precision (densekit.deploy.quantize; with ``eval.compile=true`` for the int8 / bf16 kernels).
``data.split=test-dev`` (no annotations) writes ``detections_test-dev2017_<model>_results.json`` and its zip for the
COCO evaluation server. ``eval.visualize=N`` saves N images with predictions drawn; ``eval.plots=true`` (the default)
writes ``plots/`` (densekit.evaluation.plots: PR curves, F1 against the score threshold, confusion matrix, per-class
AP, COCO error breakdown; segmentation: confusion matrix, IoU per class, samples). Detection: ``eval.tta=true``
(flip / rescale test-time augmentation, densekit.inference.tta) and ``eval.slice=[H,W]`` (sliced inference of
large images, densekit.inference.slicing). Outputs go to the run directory.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from densekit.checkpoint.io import atomic_write
from densekit.cli.errors import UsageError, reports_user_errors, run_tool
from densekit.config import register_configs
from densekit.deploy.formats import artifact_of
from densekit.deploy.optimize import optimize_for_inference
from densekit.deploy.quantize import calibration_set
from densekit.engine import distributed as dist_utils
from densekit.evaluation.plots import plots_line
from densekit.inference.wrappers import check_applicable, describe, settings_of, wrap_detector
from densekit.modeling.model_spec import finish_run_config
from densekit.tasks import get_task
from densekit.tasks.detection import input_size
from densekit.utils.files import atomic_save_json

log = logging.getLogger("densekit.eval")


def evaluate(cfg: DictConfig) -> dict:
    _, world_size, device = dist_utils.init_distributed(str(cfg.device))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    task = get_task(cfg)
    if not cfg.weights and not cfg.eval.allow_random_weights:
        raise UsageError("tools/eval.py needs weights=<checkpoint> (or eval.allow_random_weights=true)")
    # num_classes: the run's, the config's, or 90 for the public COCO checkpoints. The dataset is built from the
    # finished model config (its transform pads with the weights' pixel_mean).
    spec = finish_run_config(cfg, prefer_ema=cfg.eval.ema)
    tta, slicing = settings_of(cfg.eval)  # detection only: checked with the model below
    # Sliced inference tiles each image at its own resolution: the dataset keeps it (one image per batch).
    dataset = task.build_dataset(cfg, cfg.data.split, train=False, **({"original_size": True} if slicing else {}))
    model, what = spec.build(), spec.description
    task.check_model_fits_data(model, dataset)  # refuse a class-count mismatch before any work
    check_applicable(task.name, model, tta, slicing, "eval")
    model.to(device)
    precision = str(cfg.eval.precision)
    if artifact_of(model) is not None:  # an exported artifact: its precision and graph were fixed at export
        if precision != "fp32":
            raise ValueError(f"eval.precision={precision} applies to PyTorch weights; {cfg.weights} runs as exported "
                             "(export it at that precision: tools/export.py export.precision=...)")
    elif cfg.eval.fold_bn or cfg.eval.channels_last or cfg.eval.compile or precision != "fp32":
        # int8 calibrates on train-split images (densekit.deploy.quantize.calibration_set), never on the scored split.
        calibration = calibration_set(task, cfg, cfg.eval.calibration_images) if precision == "int8" else None
        model = optimize_for_inference(
            model, channels_last=cfg.eval.channels_last, fold_bn=cfg.eval.fold_bn, compile=cfg.eval.compile,
            precision=precision, calibration=calibration, num_images=int(cfg.eval.calibration_images),
        )
    if (inference := describe(tta, slicing)) is not None:
        model = wrap_detector(model, tta, slicing, input_size(cfg.data, cfg.model), float(cfg.eval.score_threshold))
        log.info("%s", inference)
    batch_size = 1 if slicing else cfg.eval.batch_size  # full-resolution images of different sizes; tiles batch
    loader = task.build_loader(dataset, batch_size, False, cfg.eval.num_workers, world_size > 1)
    log.info("evaluating %s (%s) on %s", cfg.model.name, what, dataset)
    evaluate = task.make_evaluate(cfg, dataset, loader, device, out_dir)
    metrics = getattr(evaluate, "final", evaluate)(model)  # the final form: with the plots of eval.plots
    if dist_utils.is_main_process():
        record = {"model": cfg.model.name, "weights": cfg.weights, "data": cfg.data.name, "split": cfg.data.split,
                  **({"inference": inference} if inference else {}), **metrics}
        atomic_save_json(record, out_dir / "metrics.json")
        with atomic_write(out_dir / "config.yaml", "w") as f:
            OmegaConf.save(cfg, f)
        print(f"results in {out_dir}")
        if (line := plots_line(metrics)) is not None:
            print(line)
    dist_utils.cleanup_distributed()
    return metrics


register_configs()


@hydra.main(config_path="../conf", config_name="eval", version_base=None)
@reports_user_errors()
def hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    """Entry point: a user's mistake is one ``error:`` block, exit code 2 (densekit.cli.errors)."""
    run_tool(hydra_main)


if __name__ == "__main__":
    main()
