"""Trainer hooks: the documented call points and order, custom hooks, and the sampler protocol resume relies on."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from densekit.data.loader import ResumableSampler
from densekit.engine.hooks import EvalHook, HookBase, MetricsJsonWriter, NanGuard, PeriodicCheckpointer, default_hooks
from densekit.engine.trainer import SkippableSampler, Trainer


class Recorder(HookBase):
    """Logs every call point with the trainer's step at that moment."""

    def __init__(self, log: list[tuple[str, int]]) -> None:
        self.log = log

    def before_train(self) -> None:
        self.log.append(("before_train", self.trainer.step))

    def before_step(self) -> None:
        self.log.append(("before_step", self.trainer.step))

    def after_step(self) -> None:
        self.log.append(("after_step", self.trainer.step))

    def after_eval(self, metrics: dict) -> None:
        self.log.append((f"after_eval {metrics['calls']}", self.trainer.step))

    def after_train(self) -> None:
        self.log.append(("after_train", self.trainer.step))


def test_hooks_see_every_point_in_order_and_evaluation_reaches_the_writers(tmp_path: Path, tiny_model, tiny_loader, train_cfg) -> None:
    """4 steps per epoch, 8 steps, evaluation every epoch: one periodic evaluation at step 4 (none at the last
    step, which the final evaluation covers), the final one after training; metrics.json records both."""
    train_cfg.max_steps, train_cfg.eval_every_epochs = 8, 1
    calls = {"n": 0}

    def evaluate(model: torch.nn.Module) -> dict:
        assert not model.training
        calls["n"] += 1
        return {"AP": 0.1 * calls["n"], "calls": calls["n"]}

    log: list[tuple[str, int]] = []
    trainer = Trainer(tiny_model, tiny_loader, train_cfg, tmp_path, torch.device("cpu"), evaluate=evaluate)
    trainer.register_hooks([Recorder(log)])
    metrics = trainer.train()

    steps = [p for p in log if p[0] in ("before_step", "after_step")]
    assert steps == [(p, s) for i in range(8) for p, s in (("before_step", i), ("after_step", i + 1))]
    assert log[0] == ("before_train", 0) and log[-1] == ("after_train", 8)
    assert ("after_eval 1", 4) in log and log[-2] == ("after_eval 2", 8)
    assert metrics["calls"] == 2 and tiny_model.training  # back in train mode after the evaluation
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [(h["step"], h["epoch"], h["AP"]) for h in history["history"]] == [(4, 1, 0.1), (8, 2, 0.2)]


def test_default_hook_order_guards_before_checkpointing_and_evaluates_before_writing() -> None:
    from densekit.config import TrainConfig

    kinds = [type(h) for h in default_hooks(TrainConfig(), evaluate=lambda m: {}, is_main=True)]
    assert kinds.index(NanGuard) == 0
    assert kinds.index(PeriodicCheckpointer) < kinds.index(EvalHook) < kinds.index(MetricsJsonWriter)
    workers = [type(h) for h in default_hooks(TrainConfig(), evaluate=None, is_main=False)]
    assert EvalHook not in workers and MetricsJsonWriter not in workers  # writers on the main process only


def test_the_data_loaders_sampler_satisfies_the_engines_resume_protocol() -> None:
    sampler = ResumableSampler(torch.utils.data.SequentialSampler(range(6)))
    assert isinstance(sampler, SkippableSampler)
    sampler.skip_next(4)
    assert list(sampler) == [4, 5] and list(sampler) == [0, 1, 2, 3, 4, 5]  # the skip applies to one pass only
