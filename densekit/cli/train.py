"""Train a model: ``densekit train [model=...] [data=...] [train.key=value ...]`` (``python tools/train.py`` in a
checkout).

With no arguments: EfficientDet-Lite0 (ImageNet backbone from the installed weights package) on the embedded
synthetic COCO-format dataset, then COCO evaluation. Segmentation: ``model=eseg_lite_s data=cityscapes``. Distributed: ``torchrun --nproc_per_node=N tools/train.py``.
An interrupted run resumes when started again with the same ``hydra.run.dir``: with the same training-defining config
(densekit/engine/run_dir.py lists the keys that may change on resume), and one training at a time per directory (a
lock file, ``train.lock``). ``.hydra/`` is written by this tool once those checks pass (``hydra.output_subdir: null``).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from densekit.checkpoint.io import read_state_dict
from densekit.checkpoint.zoo import architecture_overrides
from densekit.cli.command import command_words
from densekit.cli.errors import reports_user_errors, run_tool
from densekit.config import register_configs
from densekit.engine import distributed as dist_utils
from densekit.engine.run_dir import RunDirLock, check_resume, write_hydra_record
from densekit.engine.trainer import FinalEvaluationError, TrainConfig, Trainer
from densekit.evaluation.plots import plots_line
from densekit.evaluation.rerun import run_eval_command
from densekit.modeling.anchor_fit import check_anchor_recall
from densekit.modeling.backbones.packaged_weights import packaged_weights
from densekit.modeling.model_spec import finish_run_config
from densekit.data.progressive import StagedLoader, plan_stages
from densekit.tasks import get_task
from densekit.tasks.base import Task

log = logging.getLogger("densekit.train")


def init_backbone(model: torch.nn.Module, choice: str | None, backbone_name: str) -> tuple[str, bool]:
    """Apply ``train.backbone_weights`` (auto | none | path); returns what was used (for the summary) and whether
    the backbone now holds trained weights."""
    if choice in (None, "none"):
        return "random init", False
    path = packaged_weights(backbone_name) if choice == "auto" else Path(choice)
    if path is None:
        log.warning("no installed ImageNet weights for %s: the backbone starts from random init", backbone_name)
        return "random init (no packaged weights)", False
    model.backbone.load_weights(read_state_dict(path), source=f"backbone weights {path}")
    return str(path), True


def build_train_loader(
    cfg: DictConfig, task: Task, train_cfg: TrainConfig, train_set: Any, multiple: int, distributed: bool
) -> Any:
    """The training loader; with ``train.progressive_stages > 1`` one per stage (densekit/data/progressive.py), the
    last on ``train_set`` itself (the full size). Stage sizes are multiples of ``multiple`` (the model's stride)."""
    def loader_of(dataset: Any) -> Any:
        seed = train_cfg.seed
        return task.build_loader(dataset, train_cfg.batch_size, True, train_cfg.num_workers, distributed, seed=seed)

    full = loader_of(train_set)
    if train_cfg.progressive_stages <= 1:
        return full
    epochs = -(-train_cfg.max_steps // len(full)) if train_cfg.max_steps else train_cfg.epochs
    stages = plan_stages(
        train_cfg.progressive_stages, epochs, train_cfg.progressive_min_size, train_cfg.progressive_min_jitter
    )
    loaders, descriptions = [], []
    for stage in stages:
        overrides, description = task.stage_overrides(cfg, stage, multiple)
        if stage is stages[-1]:  # the full size and jitter: the dataset built already
            loaders.append((stage.first_epoch, full))
        else:
            stage_cfg = OmegaConf.merge(cfg, {"data": overrides})
            loaders.append((stage.first_epoch, loader_of(task.build_dataset(stage_cfg, cfg.data.train_split, True))))
        descriptions.append(description)
    return StagedLoader(loaders, descriptions)


def prepare_run_dir(cfg: DictConfig, out_dir: Path, is_main: bool) -> None:
    """Refuse (:class:`RunDirError`) a resume whose training-defining config differs from the checkpoint's, before
    anything is written; then record the config in ``.hydra/`` (main process)."""
    compared = OmegaConf.to_container(cfg, resolve=True)  # the model config as the checkpoint stores it (less classes)
    compared["model"] = OmegaConf.to_container(OmegaConf.merge(cfg.model, architecture_overrides(cfg.weights)), resolve=True)
    check_resume(out_dir, compared)
    if is_main:
        hydra_cfg = HydraConfig.get()
        write_hydra_record(out_dir, cfg, hydra_cfg.overrides.task, hydra_cfg)


def train(cfg: DictConfig) -> dict:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    # One training per run directory: the first (or only) process of a torchrun job holds the lock; torchrun stops
    # the other ranks when it exits with the error.
    is_main = int(os.environ.get("RANK", "0")) == 0  # before init_distributed: torchrun's rank
    lock = RunDirLock(out_dir).acquire() if is_main else None
    try:
        prepare_run_dir(cfg, out_dir, is_main)
        return _train(cfg, out_dir)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, out_dir: Path) -> dict:
    rank, world_size, device = dist_utils.init_distributed(str(cfg.device))
    train_cfg: TrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg.train))
    torch.manual_seed(train_cfg.seed)
    task = get_task(cfg)
    # The model config is finished first, the weights read once: a zoo checkpoint (weights=zoo:<name>) may bring
    # config keys of its own (padding, normalisation), and the datasets' transforms pad with its pixel_mean.
    spec = finish_run_config(cfg)
    train_set = task.build_dataset(cfg, cfg.data.train_split, train=True)
    val_set = task.build_dataset(cfg, cfg.data.split, train=False)
    # Every image's header, before any training: an unreadable photo stops the run here, not in its final evaluation.
    task.check_images(cfg, {cfg.data.train_split: train_set, cfg.data.split: val_set})
    if dist_utils.is_main_process():  # detection: warn when anchors miss many training boxes (densekit inspect fits them)
        check_anchor_recall(cfg, train_set, command_words("inspect"))
    # The dataset decides the classes (their names travel in the checkpoint with the model config); weights of
    # another class count fine-tune: only the class predictor starts over.
    model = spec.with_classes(task.num_classes(train_set), task.class_names(train_set)).build()
    if cfg.weights:
        init, pretrained = spec.description, True
    elif not cfg.model.backbone.weights and not cfg.model.backbone.pretrained:
        init, pretrained = init_backbone(model, train_cfg.backbone_weights, cfg.model.backbone.name)
    else:
        init, pretrained = "model.backbone config", True  # the backbone loaded its weights when it was built
    if not pretrained and train_cfg.freeze_at > 0:
        log.warning("train.freeze_at=%d freezes randomly initialised backbone layers (they will never learn); "
                    "train from scratch with train.freeze_at=0", train_cfg.freeze_at)

    distributed = world_size > 1
    loader = build_train_loader(cfg, task, train_cfg, train_set, model.size_divisor, distributed)
    val_loader = task.build_loader(val_set, cfg.eval.batch_size, False, train_cfg.num_workers, distributed)

    evaluate = task.make_evaluate(cfg, val_set, val_loader, device, out_dir)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_config["model"] = OmegaConf.to_container(model.config, resolve=True)  # with the dataset's class count
    trainer = Trainer(model, loader, train_cfg, out_dir, device, evaluate, config_to_save=run_config)
    if dist_utils.is_main_process():
        log.info("train: %s | val: %s | model %s (%d classes) | backbone init: %s | %d steps on %d process(es), device %s",
                 train_set, val_set, cfg.model.name, model.num_classes, init, trainer.total_steps, world_size, device)
    start = time.perf_counter()
    try:
        metrics = trainer.train()
    except FinalEvaluationError as err:  # the trained weights are saved: add the command that evaluates them
        command = run_eval_command(err.checkpoint, err.error, command_words("eval"))
        raise FinalEvaluationError(err.error, err.checkpoint, command) from err.error
    if dist_utils.is_main_process():
        minutes = (time.perf_counter() - start) / 60
        images = trainer.total_steps * train_cfg.batch_size * world_size
        print(
            f"\n{cfg.model.name} on {cfg.data.name}: {trainer.total_steps} steps, {images} images in {minutes:.1f} min\n"
            f"{task.headline(metrics)}  (EMA weights: {train_cfg.ema_decay > 0})\n"
            f"run directory: {out_dir}  (checkpoints/, metrics.json, tensorboard/, train.log)"
        )
        if (line := plots_line(metrics)) is not None:  # eval.plots: the final evaluation's, and training.png
            print(line)
    dist_utils.cleanup_distributed()
    return metrics


register_configs()


@hydra.main(config_path="../conf", config_name="train", version_base=None)
@reports_user_errors()
def hydra_main(cfg: DictConfig) -> None:
    train(cfg)


def main() -> None:
    """Entry point: a user's mistake (a locked run directory, a changed resume, a missing file) is one ``error:``
    block, exit code 2 (densekit.cli.errors)."""
    run_tool(hydra_main)


if __name__ == "__main__":
    main()
