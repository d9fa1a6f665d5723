"""The training plot: loss terms, learning rate and the headline metric of each evaluation, read from a run's
``metrics.json`` (:class:`~densekit.engine.hooks.MetricsJsonWriter`: ``train`` holds the losses and learning rate of
every logged step, ``history`` the scalar metrics of every evaluation)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .common import new_figure, save_figure

__all__ = ["HEADLINE_METRICS", "TrainingCurves", "training_curves", "draw_training"]

#: The headline metric of each task, in the order they are looked for in an evaluation's metrics.
HEADLINE_METRICS: tuple[str, ...] = ("AP", "mIoU")
_NOT_LOSSES = ("step", "lr")


@dataclass(frozen=True)
class TrainingCurves:
    """What :func:`draw_training` draws, as arrays (steps ascending)."""

    steps: np.ndarray  # [N] the logged steps
    losses: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [N] (NaN where a step lacks it)
    lr: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [N]
    eval_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [M]
    metric_name: str = ""
    metric: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [M]


def _headline_name(history: list[Mapping[str, Any]]) -> str:
    keys = {k for entry in history for k in entry}
    return next((name for name in HEADLINE_METRICS if name in keys), "")


def training_curves(record: Mapping[str, Any]) -> TrainingCurves:
    """The curves of a parsed ``metrics.json``: a later entry for a step replaces an earlier one (a resumed run
    logs again the steps after its checkpoint)."""
    train = {int(e["step"]): e for e in record.get("train", [])}
    steps = np.array(sorted(train), dtype=np.int64)
    names = sorted({k for e in train.values() for k in e if k not in _NOT_LOSSES}, key=lambda k: (k != "loss", k))
    losses = {n: np.array([float(train[s].get(n, np.nan)) for s in steps]) for n in names}
    lr = np.array([float(train[s].get("lr", np.nan)) for s in steps])
    history = list(record.get("history", []))
    name = _headline_name(history)
    evals = {int(e["step"]): float(e[name]) for e in history if name and name in e}
    eval_steps = np.array(sorted(evals), dtype=np.int64)
    return TrainingCurves(steps, losses, lr, eval_steps, name, np.array([evals[s] for s in eval_steps]))


def read_training_curves(metrics_json: Path) -> TrainingCurves:
    """:func:`training_curves` of the file at ``metrics_json``."""
    return training_curves(json.loads(Path(metrics_json).read_text()))


def draw_training(curves: TrainingCurves, path: Path) -> Path:
    """``training.png``: losses (total bold, terms thin), learning rate, and the headline metric per evaluation."""
    figure = new_figure(15.0, 4.5)
    loss_ax, lr_ax, metric_ax = figure.subplots(1, 3)
    for name, values in curves.losses.items():
        loss_ax.plot(curves.steps, values, label=name, linewidth=2.0 if name == "loss" else 1.0)
    loss_ax.set(xlabel="step", ylabel="loss", title="training loss")
    if curves.losses:
        loss_ax.legend(fontsize=8)
    lr_ax.plot(curves.steps, curves.lr, color="tab:green")
    lr_ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    metric_ax.plot(curves.eval_steps, curves.metric, marker="o", color="tab:purple")
    for step, value in zip(curves.eval_steps, curves.metric):
        metric_ax.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(0, 6),
                           ha="center", fontsize=8)
    metric_ax.set(xlabel="step", ylabel=curves.metric_name or "metric",
                  title=f"{curves.metric_name or 'metric'} per evaluation")
    for ax in (loss_ax, lr_ax, metric_ax):
        ax.grid(alpha=0.3)
    return save_figure(figure, path)
