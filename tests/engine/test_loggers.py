"""Experiment loggers (train.loggers): MLflow in a local file store and W&B offline, both real and read back; a
resumed training continues the same MLflow run; unknown names and missing packages are refused before training;
without loggers neither package is imported. No network: MLflow writes under tmp_path, W&B runs offline."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from densekit.config import TrainConfig
from densekit.engine.hooks import HookBase, default_hooks
from densekit.engine.loggers import LOGGERS, LoggerUnavailableError, MLflowLogger, WandbLogger
from densekit.engine.run_dir import RESUMABLE_KEYS, config_diff
from densekit.engine.trainer import Trainer

LOGGER_KEYS = ("loggers", "mlflow_uri", "experiment_name", "run_name", "wandb_project")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path: Path) -> None:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "WANDB_API_KEY", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")


class PlotWriter(HookBase):
    """Writes ``plots/curves.png`` in ``after_train``, as the run's plotting hook does before the loggers."""

    def after_train(self) -> None:
        path = self.trainer.output_dir / "plots" / "curves.png"
        path.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(path), np.full((16, 24, 3), 200, np.uint8))


def evaluate(model: torch.nn.Module) -> dict:
    return {"AP": 0.25, "AP50": 0.5, "per_class": {"a": 0.1}}


def trainer_with_plots(model, loader, cfg: TrainConfig, run_dir: Path) -> Trainer:
    """A trainer with the default hooks (the loggers last) and a plot writer just before the loggers."""
    config = {"model": {"name": "tiny_d0"}, "data": {"name": "boxes"}, "train": dataclasses.asdict(cfg)}
    hooks = default_hooks(cfg, evaluate, is_main=True)
    first_logger = next(i for i, h in enumerate(hooks) if isinstance(h, (MLflowLogger, WandbLogger)))
    hooks.insert(first_logger, PlotWriter())
    return Trainer(model, loader, cfg, run_dir, torch.device("cpu"), evaluate, config_to_save=config, hooks=hooks)


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_mlflow_logs_the_config_the_curves_and_the_plots(tmp_path: Path, tiny_model, tiny_loader, train_cfg) -> None:
    train_cfg.loggers = ["mlflow"]
    run_dir = tmp_path / "run"
    trainer = trainer_with_plots(tiny_model, tiny_loader, train_cfg, run_dir)
    trainer.train()

    client = mlflow_client(f"file:{run_dir / 'mlruns'}")  # the default store
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny_d0_boxes/run"
    assert client.get_experiment(run.info.experiment_id).name == "tiny_d0_boxes"
    params = run.data.params
    assert (params["model.name"], params["train.lr"], params["train.loggers"]) == ("tiny_d0", "0.01", "['mlflow']")

    steps = list(range(1, 7))  # log_every=1, 6 steps
    for key in ("train/loss", "train/lr", "train/images_per_s", *(f"train/{k}" for k in trainer.losses)):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == steps, key
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/AP")] == [(6, 0.25)]
    assert "eval/per_class" not in run.data.metrics  # scalars only, as TensorBoard

    artifacts = {a.path for folder in (None, "plots") for a in client.list_artifacts(run_id, folder)}
    assert {"config.yaml", "plots/curves.png"} <= artifacts
    saved = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    assert "name: tiny_d0" in saved and "lr: 0.01" in saved


def test_a_resumed_training_continues_the_same_mlflow_run(tmp_path: Path, tiny_model, tiny_loader, train_cfg,
                                                          interrupt_after) -> None:
    import copy

    train_cfg.loggers, train_cfg.mlflow_uri = ["mlflow"], f"file:{tmp_path / 'store'}"
    run_dir = tmp_path / "run"
    fresh = copy.deepcopy(tiny_model)
    with pytest.raises(KeyboardInterrupt):  # after step 5; the checkpoint of step 4 remains
        trainer_with_plots(tiny_model, interrupt_after(tiny_loader, 5), train_cfg, run_dir).train()
    client = mlflow_client(train_cfg.mlflow_uri)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"  # closed by close(), not left RUNNING

    train_cfg.log_every = 2  # a resumable key: the run keeps its first value of the parameter
    resumed = trainer_with_plots(fresh, tiny_loader, train_cfg, run_dir)
    resumed.train()
    assert resumed.step == 6
    assert (run_dir / "mlflow_run_id").read_text().strip() == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.log_every"] == "1"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    # Steps 1-5 from the first training, then step 6 (a log step of log_every=2, and the last) from the resume.
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3, 4, 5, 6]
    assert "plots/curves.png" in {a.path for a in client.list_artifacts(run_id, "plots")}


def _wandb_records(wandb_dir: Path) -> list:
    """The records of the W&B offline runs under ``wandb_dir`` (``WANDB_DIR``), oldest run first. A run's
    ``run-<id>.wandb`` is W&B's LevelDB-style log of protobuf ``Record``s: 32 KiB blocks of chunks, each with a
    7-byte header (crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted(glob.glob(str(wandb_dir / "wandb" / "*-run-*" / "run-*.wandb")), key=os.path.getmtime):
        data, pos, chunk = Path(path).read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if left < 7 or (length == 0 and kind == 0):  # the block's zero padding
                pos += left
                continue
            if pos + 7 + length > len(data):  # a record still being written
                break
            chunk += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(chunk)
                records.append(record)
                chunk = b""
    return records


@pytest.mark.slow  # W&B's service process (wandb-core) once left a pytest-xdist worker hung: make test-all runs it
def test_wandb_offline_logs_the_config_the_curves_and_the_plots_and_resumes_the_run(
    tmp_path: Path, tiny_model, tiny_loader, train_cfg, interrupt_after
) -> None:
    import copy

    pytest.importorskip("wandb", reason="W&B is in the loggers extra: pip install 'densekit[loggers]'")

    train_cfg.loggers, train_cfg.wandb_project = ["wandb"], "densekit-test"
    run_dir = tmp_path / "run"
    fresh = copy.deepcopy(tiny_model)
    with pytest.raises(KeyboardInterrupt):  # after step 5; the checkpoint of step 4 remains
        trainer_with_plots(tiny_model, interrupt_after(tiny_loader, 5), train_cfg, run_dir).train()
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    trainer = trainer_with_plots(fresh, tiny_loader, train_cfg, run_dir)
    trainer.train()
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id

    # WANDB_DIR: the two offline runs, both of run_id (`wandb sync` merges them). W&B's service process may still be
    # writing the last run's file when finish() returns: read until both runs' exit records are there.
    deadline = time.monotonic() + 30
    while True:
        records = _wandb_records(tmp_path)
        kinds = [r.WhichOneof("record_type") for r in records]
        if kinds.count("exit") == 2:
            break
        assert time.monotonic() < deadline, kinds
        time.sleep(0.2)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 2 and all(
        (r.run_id, r.project, r.run_group, r.display_name) == (run_id, "densekit-test", "tiny_d0_boxes", "tiny_d0_boxes/run")
        for r in runs
    )
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [1, 0]  # closed, finished
    config = {u.key: json.loads(u.value_json)
              for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert config["model"] == {"name": "tiny_d0"} and config["train"]["lr"] == 0.01
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history if "train/loss" in h] == [1, 2, 3, 4, 5, 5, 6]  # step 5 again after the resume
    curves = {"train/lr", "train/images_per_s", *(f"train/{k}" for k in trainer.losses)}
    assert all(curves <= set(h) for h in history if "train/loss" in h)
    last = history[-1]
    assert last["_step"] == 6 and last["eval/AP"] == 0.25 and last["plots/curves/_type"] == "image-file"


def test_unknown_logger_is_refused_before_training_listing_the_known_ones(
    tmp_path: Path, tiny_model, tiny_loader, train_cfg
) -> None:
    train_cfg.loggers = ["mlflow", "tensorbored"]
    refused = r"unknown experiment logger 'tensorbored'; choose one of mlflow, wandb \(train.loggers\)"
    with pytest.raises(ValueError, match=refused):
        Trainer(tiny_model, tiny_loader, train_cfg, tmp_path, torch.device("cpu"))
    assert not any(tmp_path.iterdir())  # nothing written
    assert set(LOGGERS) == {"mlflow", "wandb"}


@pytest.mark.parametrize("package", ["mlflow", "wandb"])
def test_a_missing_logger_package_names_the_extra_to_install(monkeypatch, package: str) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    missing = rf"train.loggers={package} needs the {package} package.*pip install 'densekit\[loggers\]'"
    with pytest.raises(LoggerUnavailableError, match=missing):
        default_hooks(TrainConfig(loggers=[package]), evaluate=None, is_main=False)  # every rank checks


def test_without_loggers_neither_package_is_imported() -> None:
    """Building the hooks imports neither package (before_train does), and a training without loggers never imports
    mlflow. (timm imports wandb itself when it is installed: timm.utils.summary, so that one is compared with what
    the trainer's own imports brought in.)"""
    code = (
        "import sys\n"
        "from densekit.config import TrainConfig\n"
        "from densekit.engine.hooks import default_hooks\n"
        "from densekit.engine.loggers import MLflowLogger, logger_hooks\n"
        "def loaded(): return {m for m in sys.modules if m.split('.')[0] in ('mlflow', 'wandb')}\n"
        "before = loaded()\n"
        "assert not any(type(h).__module__.endswith('loggers') for h in default_hooks(TrainConfig(), None, True))\n"
        "hooks = logger_hooks(TrainConfig(loggers=['mlflow', 'mlflow']))\n"  # wandb may be absent (not in dev)
        "assert [type(h) for h in hooks] == [MLflowLogger]\n"
        "print(sorted(loaded() - before), 'mlflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] False"


def test_the_logger_keys_are_in_the_schema_and_may_change_on_resume() -> None:
    from omegaconf import OmegaConf

    merged = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), {"loggers": ["mlflow", "wandb"]}))
    assert merged.loggers == ["mlflow", "wandb"] and merged.mlflow_uri is None and merged.wandb_project == "densekit"
    old, new = {"train": {k: None for k in LOGGER_KEYS}}, {"train": {k: "x" for k in LOGGER_KEYS}}
    diff = config_diff(old, new)
    assert len(diff) == len(LOGGER_KEYS)
    assert all(any(key == p or key.startswith(p + ".") for p in RESUMABLE_KEYS) for key in diff)
