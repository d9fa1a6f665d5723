"""One training engine for every task: a model that returns a dict of losses in training mode is all it needs.

The trainer owns the step: forward, backward, optimiser (SGD with momentum or AdamW), linear warm-up + cosine /
poly decay, mixed precision, channels_last weights and batches (``train.channels_last``), gradient clipping, the EMA update, frozen-backbone fine-tuning,
DistributedDataParallel (torchrun), AdvProp (``train.advprop``: :mod:`densekit.engine.advprop`), and resume from
``checkpoints/last.pth``. Everything around the step
(checkpointing, evaluation, writers, progress, the NaN stop, timing) is a hook: see :mod:`densekit.engine.hooks`.
The final evaluation runs once the last step's checkpoint is written; if it fails, :class:`FinalEvaluationError`
names that checkpoint, so a finished training is never lost to its evaluation.
The engine knows no task and imports nothing from ``data/``: mid-epoch resume asks the loader's sampler for
:class:`SkippableSampler`.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint.train_state import find_resume_checkpoint, load_checkpoint
from ..config import TrainConfig
from ..modeling.base import DenseModel
from ..modeling.dual_bn import convert_to_dual_bn
from . import distributed as dist_utils
from .advprop import AdvProp
from .ema import ModelEMA
from .hooks import EvalHook, EvaluateFn, HookBase, TrainingDiverged, default_hooks
from .schedule import warmup_cosine, warmup_poly

log = logging.getLogger(__name__)

__all__ = ["FinalEvaluationError", "SkippableSampler", "StagedLoaders", "Trainer", "TrainingDiverged"]


class FinalEvaluationError(ValueError):
    """The evaluation after the last step failed (e.g. an image that cannot be decoded); training itself finished
    and ``checkpoint`` holds its weights. A ``ValueError``: the tools report it as one ``error:`` block.

    Args:
        error: What the evaluation raised (its message names the image, for a decoding error).
        checkpoint: The saved training state of the last step, ``None`` if none was written.
        how_to_evaluate: The command that evaluates ``checkpoint``, added to the message when given.
    """

    def __init__(self, error: BaseException, checkpoint: Path | None, how_to_evaluate: str = "") -> None:
        self.error, self.checkpoint = error, checkpoint
        saved = (f"the weights of the last step are saved in {checkpoint}" if checkpoint is not None
                 else "no checkpoint was written (no PeriodicCheckpointer hook)")
        message = f"training finished, but its final evaluation failed: {_root_message(error)}\n{saved}"
        if how_to_evaluate:
            message += f"\nevaluate them with:\n  {how_to_evaluate}"
        super().__init__(message)


def _root_message(error: BaseException) -> str:
    """The message of ``error``; for one re-raised from a DataLoader worker, the worker's exception line (its
    message starts with the worker's traceback)."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    kind, _, message = last.partition(": ")
    return message if message and kind.split(".")[-1].endswith(("Error", "Exception")) else last


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` (None: full precision); fp16 comes with loss scaling (GradScaler)."""
    dtypes = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if amp not in dtypes:
        raise ValueError(f"train.amp must be one of none, fp16, bf16; got {amp!r}")
    if dtypes[amp] is torch.float16 and device.type == "cpu":
        # It works (autocast and GradScaler exist on the CPU) but few CPUs have fast fp16: bf16 is the CPU's one.
        log.warning("train.amp=fp16 on the CPU: correct but far slower than fp32; train.amp=bf16 is the fast choice")
    return dtypes[amp]


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every tensor in the default (NCHW) layout: a checkpoint of a channels_last run (train.channels_last)
    is the same file as any other, for tools that reshape its tensors."""
    return {k: v.contiguous() for k, v in state.items()}


@runtime_checkable
class SkippableSampler(Protocol):
    """A sampler that can start its next pass after the first ``count`` indices without yielding them, so that a
    mid-epoch resume does not load the images already seen (``densekit.data.loader.ResumableSampler`` is one)."""

    def skip_next(self, count: int) -> None: ...


@runtime_checkable
class StagedLoaders(Protocol):
    """A loader per training stage (``densekit.data.progressive.StagedLoader`` is one): the trainer iterates
    ``for_epoch(epoch)`` in each epoch; all stages have ``len()`` batches per epoch."""

    stages: list
    descriptions: list

    def __len__(self) -> int: ...

    def for_epoch(self, epoch: int) -> Iterable: ...

    def stage_index(self, epoch: int) -> int: ...


class Trainer:
    """Runs the training loop.

    Args:
        model: Returns a dict of losses from ``model(images, targets)`` in training mode.
        loader: Yields ``(images, targets)`` batches; a ``DistributedSampler`` if running under torchrun. A
            :class:`StagedLoaders` (progressive learning) gives each epoch its stage's loader.
        cfg: Training settings.
        output_dir: Run directory: ``checkpoints/``, ``tensorboard/``, ``metrics.json``.
        device: Where to train.
        evaluate: Called on every rank with the weights to evaluate (EMA if enabled); returns a metrics dict.
        config_to_save: Resolved run config (plain containers) stored in every checkpoint.
        hooks: What runs around each step; ``None``: :func:`~densekit.engine.hooks.default_hooks` for ``cfg``.
    """

    def __init__(
        self,
        model: nn.Module,
        loader: Iterable,
        cfg: TrainConfig,
        output_dir: str | Path,
        device: torch.device,
        evaluate: EvaluateFn | None = None,
        config_to_save: dict[str, Any] | None = None,
        hooks: list[HookBase] | None = None,
    ) -> None:
        self.cfg = cfg
        self.loader = loader
        self.output_dir = Path(output_dir)
        self.device = device
        self.config_to_save = config_to_save or {}
        # A process group (torchrun, or one the caller set up, even of one process) means DDP and, asked for, SyncBN.
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world_size = torch.distributed.get_world_size() if self.distributed else 1
        self.is_main = dist_utils.is_main_process()

        self.advprop = AdvProp.from_config(cfg) if cfg.advprop else None
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = self._prepare_model(model)
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.ddp = (
            DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
            if self.distributed
            else None
        )
        # train.compile: the network and loss (and so their backward) through torch.compile; minutes of compilation
        # first. A densekit model compiles its own tensor work (DenseModel.compile_for_training: the checks on the
        # targets stay eager, and a new box count does not recompile the network); any other model as a whole.
        self.forward: nn.Module = self.ddp or self.model
        if cfg.compile:
            if isinstance(self.model, DenseModel):
                self.model.compile_for_training()
            else:
                self.forward = torch.compile(self.forward)

        self.steps_per_epoch = len(loader)
        if self.steps_per_epoch == 0:
            raise ValueError("the training loader is empty: no images (or fewer than one batch with drop_last)")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.optimizer = self._build_optimizer()
        warmup = int(cfg.warmup_epochs * self.steps_per_epoch)
        if cfg.schedule not in ("cosine", "poly"):
            raise ValueError(f"train.schedule must be 'cosine' or 'poly', got {cfg.schedule!r}")
        factor = (warmup_cosine if cfg.schedule == "cosine" else warmup_poly)(self.total_steps, warmup, warmup_factor=cfg.warmup_factor)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.amp_dtype = _amp_dtype(cfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
        self.step = 0
        # What the step leaves for the hooks: its losses, the images it consumed (all ranks), the final metrics.
        self.losses: dict[str, torch.Tensor] = {}
        self.loss = torch.zeros(())
        self.images_in_step = 0
        self.images_per_s = 0.0
        self.metrics: dict[str, Any] = {}
        self.epoch_evaluated = 0
        self._current_loader: Iterable | None = None
        self.hooks: list[HookBase] = []
        self.register_hooks(default_hooks(cfg, evaluate, self.is_main) if hooks is None else hooks)

    def _prepare_model(self, model: nn.Module) -> nn.Module:
        """What the optimiser, the EMA copy and DDP must already see: frozen backbone, SyncBN, AdvProp's auxiliary
        BNs, the device and the memory layout."""
        cfg = self.cfg
        if cfg.sync_bn and self.distributed:
            if self.device.type == "cuda":
                model = dist_utils.convert_sync_batchnorm(model)
            else:
                log.warning("train.sync_bn ignored: PyTorch's SyncBatchNorm runs on GPUs only")
        if self.advprop:
            log.info("train.advprop: %d BatchNorms get auxiliary twins for adversarial batches", convert_to_dual_bn(model))
        # After the BN conversions above, which replace modules: the frozen list must hold the ones that run.
        self.frozen = self._frozen_layers(model)
        for layer in self.frozen:
            layer.requires_grad_(False)
        return model.to(self.device, memory_format=self.memory_format)

    def _frozen_layers(self, model: nn.Module) -> list[nn.Module]:
        """The layers ``train.freeze_backbone`` / ``train.freeze_at`` keep as they are (weights and BN statistics)."""
        if self.cfg.freeze_backbone:
            return [model.backbone]
        if self.cfg.freeze_at < 0:
            raise ValueError(f"train.freeze_at must be >= 0 (0: train every layer), got {self.cfg.freeze_at}")
        if self.cfg.freeze_at == 0:
            return []
        stride = 2**self.cfg.freeze_at
        layers = model.backbone.layers_up_to_stride(stride)
        names = {id(module): name for name, module in model.named_modules()}
        count = sum(p.numel() for layer in layers for p in layer.parameters())
        log.info("train.freeze_at=%d: %d backbone layers up to stride %d frozen (%s; %d parameters)",
                 self.cfg.freeze_at, len(layers), stride, ", ".join(names[id(m)] for m in layers), count)
        return layers

    def register_hooks(self, hooks: list[HookBase]) -> None:
        """Append ``hooks`` (they run after the ones already registered)."""
        for hook in hooks:
            hook.trainer = self
        self.hooks.extend(hooks)

    # ----------------------------------------------------------------------------------------------- setup
    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        lr = cfg.lr if cfg.lr is not None else cfg.base_lr * cfg.batch_size * self.world_size / 64.0
        # No weight decay on BN / bias / BiFPN fusion weights: decaying them only fights the normalisation.
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # foreach: one fused update over all tensors; torch picks it on GPUs only, but it is as exact and faster on CPUs.
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, foreach=True)
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=lr, foreach=True)
        raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def state_dict(self) -> dict[str, Any]:
        ema = self.ema.state_dict() if self.ema else None
        return {
            "model": _contiguous(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": {**ema, "module": _contiguous(ema["module"])} if ema else None,
            "step": self.step,
            "total_steps": self.total_steps,
            "config": self.config_to_save,
        }

    def resume_if_possible(self) -> bool:
        """Continue from ``checkpoints/last.pth`` of this run directory if there is one."""
        path = find_resume_checkpoint(self.checkpoint_dir)
        if path is None:
            return False
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        log.info("resumed from %s at step %d / %d", path, self.step, self.total_steps)
        return True

    # ------------------------------------------------------------------------------------------------ loop
    def _batches(self) -> Iterator[tuple[int, Any]]:
        """Endless (epoch, batch) stream starting at ``self.step``; mid-epoch resumes skip the batches already seen
        (without loading them when the loader's sampler is a :class:`SkippableSampler`)."""
        epoch, skip = divmod(self.step, self.steps_per_epoch)
        while True:
            loader = self._loader_of(epoch)
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            # Re-seed the shuffle per epoch so a resumed run sees the same order as an uninterrupted one.
            generator = getattr(loader, "generator", None)
            if isinstance(generator, torch.Generator):
                generator.manual_seed(self.cfg.seed * 1_000_003 + epoch)
            batch_size = getattr(loader, "batch_size", None)
            if skip and isinstance(sampler, SkippableSampler) and batch_size:
                sampler.skip_next(skip * batch_size)  # start after the seen images without loading them
                batches = iter(loader)
            else:  # any other loader: load the seen batches and drop them
                batches = itertools.islice(iter(loader), skip, None)
            for batch in batches:
                yield epoch, batch
            epoch, skip = epoch + 1, 0

    def _loader_of(self, epoch: int) -> Iterable:
        """The loader of ``epoch``: a :class:`StagedLoaders` (progressive learning) has one per stage."""
        if not isinstance(self.loader, StagedLoaders):
            return self.loader
        loader = self.loader.for_epoch(epoch)
        if loader is not self._current_loader:
            index = self.loader.stage_index(epoch)
            what = self.loader.descriptions[index] if index < len(self.loader.descriptions) else ""
            stages = len(self.loader.stages)
            log.info("progressive learning: stage %d / %d from epoch %d %s", index + 1, stages, epoch, what)
            self._current_loader = loader
        return loader

    def _to_device(self, images: torch.Tensor, targets: list[dict[str, Any]]):
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        return images, targets

    def _call_hooks(self, point: str) -> None:
        for hook in self.hooks:
            getattr(hook, point)()

    def train(self) -> dict[str, Any]:
        """Train to ``total_steps`` (resuming if possible); returns the final metrics (main process)."""
        self.resume_if_possible()
        self.set_train_mode()
        self._call_hooks("before_train")
        try:
            for _, (images, targets) in self._batches():
                if self.step >= self.total_steps:
                    break
                self._call_hooks("before_step")
                self.run_step(images, targets)
                self._call_hooks("after_step")
        except BaseException:  # a NaN stop, Ctrl-C, an error: the writers flush, the progress bar ends
            self._call_hooks("close")
            raise
        self._after_train()
        return self.metrics

    def _after_train(self) -> None:
        """Every hook's ``after_train``, the final evaluation (:class:`EvalHook`) included, which the checkpoint of the
        last step precedes (``PeriodicCheckpointer`` writes it in that step's ``after_step``). A failed evaluation
        still lets the other hooks finish (the TensorBoard writer flushes), then raises what it raised: a user's
        error (``OSError`` / ``ValueError``: a file) as :class:`FinalEvaluationError` naming the checkpoint, any
        other with a note naming it."""
        failure: Exception | None = None
        for hook in self.hooks:
            if not isinstance(hook, EvalHook):
                hook.after_train()
                continue
            try:
                hook.after_train()
            except Exception as error:  # anything: the run's record is written either way
                failure = error
        if failure is None:
            return
        checkpoint = find_resume_checkpoint(self.checkpoint_dir)
        if isinstance(failure, (OSError, ValueError)):
            raise FinalEvaluationError(failure, checkpoint) from failure
        if hasattr(failure, "add_note"):  # Python 3.11+: shown under the traceback
            failure.add_note(f"training finished; the weights of the last step are saved in {checkpoint}")
        raise failure

    def run_step(self, images: torch.Tensor, targets: list[dict[str, Any]]) -> None:
        """One optimisation step on a batch: forward (autocast), backward (scaled), clip, step, schedule, EMA."""
        images, targets = self._to_device(images, targets)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            forward = self.forward
            if self.advprop:  # clean + adversarial losses (adv_*), through the main and auxiliary BNs
                losses = self.advprop.losses(self.model, forward, images, targets)
            else:
                losses = forward(images, targets)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema:
            self.ema.update(self.model)
        self.step += 1
        self.losses = {k: v.detach() for k, v in losses.items()}
        self.loss = loss.detach()
        self.images_in_step = images.shape[0] * self.world_size

    @property
    def lr(self) -> float:
        """The learning rate of the first parameter group (after this step's schedule update)."""
        return self.optimizer.param_groups[0]["lr"]

    def set_train_mode(self) -> None:
        self.model.train()
        for layer in self.frozen:
            layer.eval()  # frozen layers keep their BN statistics too

    def eval_model(self) -> nn.Module:
        """The weights evaluation uses: the EMA copy when enabled."""
        return self.ema.module if self.ema else self.model
