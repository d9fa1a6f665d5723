"""Trainer hooks: everything around the training step (detectron2's ``HookBase`` pattern).

A hook sees the trainer at five points: ``before_train``, ``before_step``, ``after_step``, ``after_eval(metrics)``
and ``after_train``. Hooks run in list order at every point; :func:`default_hooks` builds the standard list in
this order, and the order matters:

1. :class:`NanGuard`: stops on a non-finite loss first, so that a diverged step is never checkpointed or logged.
2. :class:`IterationTimer`: images per second since the start (or resume), for the writers.
3. :class:`ProgressBar`: the console writer (tqdm: loss, lr and images/s every ``log_every`` steps); closes before
   the final evaluation prints its table.
4. :class:`PeriodicCheckpointer`: ``checkpoints/last.pth`` every ``checkpoint_every`` steps and at the last step.
5. :class:`EvalHook`: every ``eval_every_epochs`` epochs and after training; hands the metrics to every hook's
   ``after_eval``, so it precedes the writers that record them.
6. :class:`TensorBoardWriter`: train scalars every ``log_every`` steps, eval scalars after each evaluation.
7. :class:`MetricsJsonWriter`: the evaluation history, the final metrics and the logged losses in ``metrics.json``;
   ``plots/training.png`` from them in ``after_train`` (``eval.plots``).
8. The experiment loggers of ``train.loggers`` (:mod:`densekit.engine.loggers`: MLflow, W&B), last: they log the
   plots the hooks before them write in ``after_train``.

Writers run on the main process only; checkpointing and evaluation are collective (every rank calls them).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from tqdm import tqdm

from ..utils.files import atomic_save_json
from . import distributed as dist_utils
from ..checkpoint.train_state import find_resume_checkpoint, save_checkpoint

if TYPE_CHECKING:  # the trainer imports this module
    from ..config import TrainConfig
    from .trainer import Trainer

EvaluateFn = Callable[[nn.Module], dict[str, Any]]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class HookBase:
    """Does nothing at every point; subclasses override the points they need. ``self.trainer`` is set on
    registration."""

    trainer: Trainer

    def before_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_eval(self, metrics: dict[str, Any]) -> None:
        """Called on every hook with the metrics of each evaluation (periodic and final)."""

    def after_train(self) -> None:
        pass

    def close(self) -> None:
        """Release what :meth:`before_train` opened (files, writers, the progress bar). Called when training stops
        early (a NaN stop, Ctrl-C, an error) instead of :meth:`after_train`, which calls it itself where needed;
        calling it twice is harmless."""


def is_log_step(trainer: Trainer) -> bool:
    """Whether the step just taken is one the writers report (every ``log_every`` and the last)."""
    return trainer.step % trainer.cfg.log_every == 0 or trainer.step == trainer.total_steps


class NanGuard(HookBase):
    """Raises :class:`TrainingDiverged` when the step's loss is not finite on any rank, naming the last good
    checkpoint (the all-reduce keeps every rank stopping together)."""

    def after_step(self) -> None:
        t = self.trainer
        if not dist_utils.all_finite(t.loss):
            last = find_resume_checkpoint(t.checkpoint_dir)
            raise TrainingDiverged(
                f"loss is {t.loss.item()} at step {t.step - 1} ({ {k: round(v.item(), 4) for k, v in t.losses.items()} }); "
                f"stopping. Last good checkpoint: {last or 'none yet'}. Try a lower train.lr or train.amp=none."
            )


class IterationTimer(HookBase):
    """Keeps ``trainer.images_per_s``: images (all ranks) per second of this session's training."""

    def before_train(self) -> None:
        self.seen, self.start = 0, time.perf_counter()
        self.trainer.images_per_s = 0.0

    def after_step(self) -> None:
        t = self.trainer
        self.seen += t.images_in_step
        t.images_per_s = self.seen / (time.perf_counter() - self.start)


class ProgressBar(HookBase):
    """The console writer: a tqdm bar over the steps, with loss, lr and images/s every ``log_every`` steps."""

    def before_train(self) -> None:
        t = self.trainer
        self.bar = tqdm(total=t.total_steps, initial=t.step, disable=not t.is_main, desc="train", dynamic_ncols=True)

    def after_step(self) -> None:
        t = self.trainer
        self.bar.update(1)
        if is_log_step(t):
            self.bar.set_postfix(loss=f"{t.loss.item():.4f}", lr=f"{t.lr:.2e}", img_s=f"{t.images_per_s:.1f}")

    def after_train(self) -> None:
        self.close()

    def close(self) -> None:
        self.bar.close()


class PeriodicCheckpointer(HookBase):
    """Writes the training state atomically every ``every`` steps and at the last step (main process; all ranks
    wait for it, so that none runs ahead of a checkpoint it might resume from)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def after_step(self) -> None:
        t = self.trainer
        if t.step % self.every == 0 or t.step == t.total_steps:
            if t.is_main:
                save_checkpoint(t.checkpoint_dir, t.state_dict())
            dist_utils.barrier()


class EvalHook(HookBase):
    """Evaluates the weights :meth:`Trainer.eval_model` picks (EMA when enabled) at every ``every_epochs``-th epoch
    end before the last step, and once after training; the final metrics become ``trainer.metrics``.

    Every rank evaluates its shard of the validation set; the evaluator gathers and broadcasts the metrics.
    """

    def __init__(self, evaluate: EvaluateFn, every_epochs: int) -> None:
        self.evaluate, self.every_epochs = evaluate, every_epochs

    def _run(self, epoch: int, final: bool = False) -> None:
        t = self.trainer
        # The final evaluation takes the evaluation's ``final`` form when it has one (the plots of eval.plots:
        # densekit.evaluation.loop.Evaluation); the periodic ones stay cheap.
        evaluate = getattr(self.evaluate, "final", self.evaluate) if final else self.evaluate
        t.metrics = evaluate(t.eval_model())
        t.epoch_evaluated = epoch
        t.set_train_mode()
        for hook in t.hooks:
            hook.after_eval(t.metrics)
        dist_utils.barrier()

    def after_step(self) -> None:
        t = self.trainer
        end_of_epoch = t.step % t.steps_per_epoch == 0
        epoch = t.step // t.steps_per_epoch
        if self.every_epochs and end_of_epoch and epoch % self.every_epochs == 0 and t.step < t.total_steps:
            self._run(epoch)

    def after_train(self) -> None:
        self._run(math.ceil(self.trainer.step / self.trainer.steps_per_epoch), final=True)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


class TensorBoardWriter(HookBase):
    """``tensorboard/`` under the run directory: ``train/*`` losses, lr and images/s, ``eval/*`` metrics."""

    def before_train(self) -> None:
        from torch.utils.tensorboard import SummaryWriter  # late: tensorboard's import costs a second

        self.writer = SummaryWriter(self.trainer.output_dir / "tensorboard")

    def after_step(self) -> None:
        t = self.trainer
        if is_log_step(t):
            for k, v in t.losses.items():
                self.writer.add_scalar(f"train/{k}", v.item(), t.step)
            self.writer.add_scalar("train/loss", t.loss.item(), t.step)
            self.writer.add_scalar("train/lr", t.lr, t.step)
            self.writer.add_scalar("train/images_per_s", t.images_per_s, t.step)

    def after_eval(self, metrics: dict[str, Any]) -> None:
        for k, v in _scalars(metrics).items():
            self.writer.add_scalar(f"eval/{k}", v, self.trainer.step)

    def after_train(self) -> None:
        self.close()

    def close(self) -> None:
        self.writer.close()  # flushes the events written so far


class MetricsJsonWriter(HookBase):
    """``metrics.json``: one history entry (step, epoch, scalar metrics) per evaluation, the last metrics as
    ``final``, and ``train``: the loss terms and learning rate of every logged step (written with each evaluation);
    rewritten atomically, and a resumed run appends to the history it finds. With ``plots`` (``eval.plots``), the
    curves go to ``plots/training.png`` when training ends (:mod:`densekit.evaluation.plots.training`)."""

    def __init__(self, plots: bool = False) -> None:
        self.plots = plots
        self.logged: list[dict[str, float]] = []

    def after_step(self) -> None:
        t = self.trainer
        if is_log_step(t):
            self.logged.append({"step": t.step, "loss": t.loss.item(), **{k: v.item() for k, v in t.losses.items()},
                                "lr": t.lr})

    def after_eval(self, metrics: dict[str, Any]) -> None:
        t = self.trainer
        path = Path(t.output_dir) / "metrics.json"
        history = json.loads(path.read_text()) if path.is_file() else {"history": []}
        history["history"].append({"step": t.step, "epoch": t.epoch_evaluated, **_scalars(metrics)})
        history["final"] = metrics
        if self.logged:  # a resumed run logs again the steps after its checkpoint: the new entries replace those
            history["train"] = [e for e in history.get("train", []) if e["step"] < self.logged[0]["step"]] + self.logged
            self.logged = []
        atomic_save_json(history, path)

    def after_train(self) -> None:
        if self.plots:
            from ..evaluation.plots import plot_training_run

            plot_training_run(Path(self.trainer.output_dir))


def default_hooks(cfg: TrainConfig, evaluate: EvaluateFn | None, is_main: bool) -> list[HookBase]:
    """The standard hooks in their documented order (see the module docstring); writers on the main process only."""
    hooks: list[HookBase] = [NanGuard(), IterationTimer(), ProgressBar(), PeriodicCheckpointer(cfg.checkpoint_every)]
    if evaluate is not None:
        hooks.append(EvalHook(evaluate, cfg.eval_every_epochs))
    from .loggers import logger_hooks  # it imports this module; refuses an unknown logger on every rank

    loggers = logger_hooks(cfg)
    if is_main:
        hooks += [TensorBoardWriter(), MetricsJsonWriter(plots=bool(getattr(evaluate, "plots", False))), *loggers]
    return hooks
