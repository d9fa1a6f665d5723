"""Experiment loggers: optional hooks that send a run to MLflow and / or Weights & Biases (``train.loggers``).

``train.loggers=[mlflow]``, ``[wandb]`` or ``[mlflow,wandb]`` (default ``[]``: none, and neither package is
imported). Each logger records, on the main process:

* the config: the resolved run config the trainer saves in its checkpoints (``Trainer.config_to_save``), as
  parameters (flattened dotted keys) and as ``config.yaml``;
* the curves: what :class:`~densekit.engine.hooks.TensorBoardWriter` writes, under the same names: ``train/<loss>``,
  ``train/loss``, ``train/lr`` and ``train/images_per_s`` every ``train.log_every`` steps, ``eval/<metric>`` after
  each evaluation;
* the plots: every PNG in ``<run dir>/plots/`` when training ends (the hooks before the loggers write them).

The packages are the ``loggers`` extra (``pip install 'densekit[loggers]'``); a logger whose package is missing, or
an unknown name, is refused when the trainer is built, before any training. Each package is imported in the hook's
``before_train``. The logger's run is closed in ``after_train`` (finished) or in ``close`` (a stopped training: failed
or killed). A resumed training continues the same MLflow run (its id is kept in ``<run dir>/mlflow_run_id``) and the
same W&B run id (``<run dir>/wandb_run_id``).

Settings (``train.*``, all of which may change on resume): ``mlflow_uri`` (default ``$MLFLOW_TRACKING_URI`` if set,
else ``file:<run dir>/mlruns``), ``experiment_name`` (MLflow experiment, W&B group; default
``<model.name>_<data.name>``), ``run_name`` (default ``<experiment name>/<run directory name>``), ``wandb_project``
(default ``densekit``). W&B reads its own environment (``WANDB_MODE=offline``, ``WANDB_DIR``, ``WANDB_API_KEY``...);
its files go to ``<run dir>/wandb/`` unless ``WANDB_DIR`` says otherwise.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
import sys
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint.io import atomic_write
from ..config import flatten_config
from ..modeling.registry import Registry
from .hooks import HookBase, _scalars, is_log_step

if TYPE_CHECKING:
    from ..config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["LOGGERS", "LoggerUnavailableError", "MLflowLogger", "WandbLogger", "logger_hooks"]

EXTRA = "loggers"  # the pyproject extra that installs every logger's package


class LoggerUnavailableError(ValueError):
    """A logger in ``train.loggers`` whose package is not installed (a user's error: the message says what to
    install)."""


class ExperimentLogger(HookBase):
    """A hook that logs the run to an experiment tracker; subclasses name the package they need."""

    #: The name in ``train.loggers``.
    name: str = ""
    #: The module imported in ``before_train`` (and the pip package that provides it).
    package: str = ""

    @classmethod
    def check_available(cls) -> None:
        """Raise :class:`LoggerUnavailableError` if :attr:`package` is not installed (without importing it)."""
        try:
            found = importlib.util.find_spec(cls.package) is not None
        except (ImportError, ValueError):  # a broken install, or sys.modules[package] = None
            found = False
        if not found:
            raise LoggerUnavailableError(
                f"train.loggers={cls.name} needs the {cls.package} package, which is not installed: "
                f"pip install 'densekit[{EXTRA}]' (or pip install {cls.package}), "
                f"or leave {cls.name} out of train.loggers"
            )

    # --------------------------------------------------------------------------------- what every logger logs
    def run_config(self) -> dict[str, Any]:
        """The resolved run config the trainer saves (``{"train": TrainConfig}`` for a trainer given none)."""
        t = self.trainer
        return dict(t.config_to_save) if t.config_to_save else {"train": dataclasses.asdict(t.cfg)}

    def names(self) -> tuple[str, str]:
        """``(experiment name, run name)``: the configured ones, else ``<model>_<data>`` and
        ``<experiment>/<run dir name>``."""
        t, config = self.trainer, self.trainer.config_to_save or {}
        parts = [(config.get(group) or {}).get("name") for group in ("model", "data")]
        experiment = t.cfg.experiment_name or "_".join(str(p) for p in parts if p) or "densekit"
        return experiment, t.cfg.run_name or f"{experiment}/{t.output_dir.name}"

    def train_scalars(self) -> dict[str, float]:
        """The scalars :class:`~densekit.engine.hooks.TensorBoardWriter` writes at a log step, by the same names."""
        t = self.trainer
        scalars = {f"train/{k}": v.item() for k, v in t.losses.items()}
        scalars.update({"train/loss": t.loss.item(), "train/lr": t.lr, "train/images_per_s": t.images_per_s})
        return scalars

    def plots(self) -> list[Path]:
        """The PNGs in ``<run dir>/plots/`` now (none if it does not exist)."""
        return sorted((self.trainer.output_dir / "plots").glob("*.png"))

    def id_file(self, stem: str) -> Path:
        return self.trainer.output_dir / stem

    def previous_run_id(self, stem: str) -> str | None:
        """The logger run id a resumed training continues: the one stored in ``<run dir>/<stem>`` by the training it
        resumes (none for a training from step 0, which starts a new logger run)."""
        path = self.id_file(stem)
        if self.trainer.step == 0 or not path.is_file():
            return None
        return path.read_text().strip() or None

    def store_run_id(self, stem: str, run_id: str) -> None:
        with atomic_write(self.id_file(stem), "w") as f:
            f.write(run_id + "\n")


LOGGERS: Registry[type[ExperimentLogger]] = Registry("experiment logger", "train.loggers")


def _key(name: str) -> str:
    """A metric / parameter name MLflow accepts: alphanumerics, ``_ - . /`` and spaces (others become ``_``)."""
    return re.sub(r"/+", "/", re.sub(r"[^\w.\- /]", "_", name)).strip("/") or "_"


def _closing_status() -> str:
    """MLflow's status for a run closed early: KILLED for Ctrl-C, FAILED otherwise (the trainer calls ``close``
    while it handles the exception that stopped training)."""
    error = sys.exc_info()[1]
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


@LOGGERS.register("mlflow")
class MLflowLogger(ExperimentLogger):
    """Logs to MLflow through ``MlflowClient`` (no global MLflow state): params and ``config.yaml``, the curves as
    metrics with their step, the plots as artifacts under ``plots/``. A resumed training continues the run whose id
    is in ``<run dir>/mlflow_run_id`` (new parameters are added; MLflow keeps a parameter's first value)."""

    name = "mlflow"
    package = "mlflow"
    ID_FILE = "mlflow_run_id"
    PARAM_LENGTH = 500  # every MLflow >= 2 takes 500 characters; config.yaml holds the full values

    client: Any = None
    run_id: str | None = None

    def tracking_uri(self) -> str:
        uri = (self.trainer.cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
               or f"file:{(self.trainer.output_dir / 'mlruns').resolve()}")
        if urllib.parse.urlparse(uri).scheme in ("", "file"):
            # A local file store: recent MLflow 3 releases refuse it (maintenance mode) unless this is set.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return uri

    def before_train(self) -> None:
        from mlflow.tracking import MlflowClient  # late: mlflow's import costs ~2 s

        self.client = MlflowClient(tracking_uri=self.tracking_uri())
        experiment_name, run_name = self.names()
        run_id = self.previous_run_id(self.ID_FILE)
        if run_id is not None and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            log.info("mlflow: continuing run %s at step %d", run_id, self.trainer.step)
        else:
            if run_id is not None:
                log.warning("mlflow: run %s of %s is not in %s: logging the resumed training to a new run",
                            run_id, self.id_file(self.ID_FILE), self.client.tracking_uri)
            experiment = self.client.get_experiment_by_name(experiment_name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
            run = self.client.create_run(experiment_id, run_name=run_name,
                                         tags={"densekit.run_dir": str(self.trainer.output_dir.resolve())})
            run_id = run.info.run_id
            self.store_run_id(self.ID_FILE, run_id)
        self.run_id = run_id
        self._log_config()

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def _log_config(self) -> None:
        from mlflow.entities import Param

        config = self.run_config()
        logged = self.client.get_run(self.run_id).data.params  # a resumed run's: parameters cannot change
        params = [Param(_key(k), str(v)[: self.PARAM_LENGTH]) for k, v in flatten_config(config).items()]
        params = [p for p in params if p.key not in logged]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def _log_metrics(self, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), self.trainer.step
        metrics = [Metric(_key(k), float(v), now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def after_step(self) -> None:
        if is_log_step(self.trainer):
            self._log_metrics(self.train_scalars())

    def after_eval(self, metrics: dict[str, Any]) -> None:
        self._log_metrics({f"eval/{k}": v for k, v in _scalars(metrics).items()})

    def after_train(self) -> None:
        if self.run_id is None:
            return
        for path in self.plots():
            self.client.log_artifact(self.run_id, str(path), "plots")
        self.client.set_terminated(self.run_id, "FINISHED")
        self.run_id = None

    def close(self) -> None:
        if self.run_id is not None:
            run_id, self.run_id = self.run_id, None
            try:  # never hide what stopped the training
                self.client.set_terminated(run_id, _closing_status())
            except Exception as error:
                log.warning("mlflow: could not close run %s: %s", run_id, error)


@LOGGERS.register("wandb")
class WandbLogger(ExperimentLogger):
    """Logs to Weights & Biases: the config as the run's config, the curves with ``step=trainer.step``, the plots as
    ``plots/<name>`` images at the last step. Project ``train.wandb_project``, group the experiment name. A resumed
    training reuses the run id in ``<run dir>/wandb_run_id`` (``resume="allow"``)."""

    name = "wandb"
    package = "wandb"
    ID_FILE = "wandb_run_id"

    run: Any = None

    def before_train(self) -> None:
        import wandb  # late: only when asked for

        t = self.trainer
        experiment_name, run_name = self.names()
        t.output_dir.mkdir(parents=True, exist_ok=True)  # wandb.init(dir=) wants an existing folder
        try:
            self.run = wandb.init(
                project=t.cfg.wandb_project, group=experiment_name, name=run_name,
                id=self.previous_run_id(self.ID_FILE), resume="allow", dir=os.environ.get("WANDB_DIR") or str(t.output_dir),
            )
        except wandb.errors.Error as error:  # not logged in, no connection: the user's to fix
            raise LoggerUnavailableError(
                f"train.loggers=wandb: W&B could not start a run: {error}\nLog in (wandb login, or set WANDB_API_KEY), "
                f"or log offline with WANDB_MODE=offline and upload later with wandb sync"
            ) from error
        self.store_run_id(self.ID_FILE, self.run.id)
        self.run.config.update(self.run_config(), allow_val_change=True)  # a resume may change resumable keys

    def after_step(self) -> None:
        if is_log_step(self.trainer):
            self.run.log(self.train_scalars(), step=self.trainer.step)

    def after_eval(self, metrics: dict[str, Any]) -> None:
        self.run.log({f"eval/{k}": v for k, v in _scalars(metrics).items()}, step=self.trainer.step)

    def after_train(self) -> None:
        if self.run is None:
            return
        import wandb

        plots = {f"plots/{path.stem}": wandb.Image(str(path)) for path in self.plots()}
        if plots:
            self.run.log(plots, step=self.trainer.step)
        self.run.finish()
        self.run = None

    def close(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            try:  # never hide what stopped the training
                run.finish(exit_code=1)
            except Exception as error:
                log.warning("wandb: could not finish run %s: %s", run.id, error)


def logger_hooks(cfg: TrainConfig) -> list[ExperimentLogger]:
    """The hooks of ``cfg.loggers`` (each name once, in order). Refuses an unknown name (``ValueError`` listing the
    known ones) and a logger whose package is missing (:class:`LoggerUnavailableError` naming the extra); imports
    neither package."""
    names = [cfg.loggers] if isinstance(cfg.loggers, str) else list(cfg.loggers or [])
    classes = [LOGGERS.get(name) for name in dict.fromkeys(names)]
    for cls in classes:
        cls.check_available()
    return [cls() for cls in classes]
