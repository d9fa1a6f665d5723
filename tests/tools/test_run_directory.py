"""tools/train.py run directories (densekit/engine/run_dir.py): a resume with another training-defining config or
another model is refused with the diff before anything is written, accepted changes are listed, and a second
training on a locked directory is refused while a stale lock is taken over. One tiny 2-step run serves every test."""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from densekit.engine.run_dir import RESUMABLE_KEYS, RunDirError, RunDirLock, config_diff

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=efficientdet_d0", "model.neck.repeats=1", "model.neck.channels=16", "model.head.repeats=1",
        "data.num_train=8", "data.num_val=2", "data.image_size=64", "train.max_steps=2", "train.batch_size=2",
        "train.lr=0.001", "train.num_workers=0", "train.backbone_weights=none", "train.eval_every_epochs=0",
        "eval.plots=false"]


def train_cmd(run: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "train.py"), *TINY, *overrides, f"hydra.run.dir={run}"]


def env_for(datasets: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "DENSEKIT_DATASETS": str(datasets), "OMP_NUM_THREADS": "1"}


def fingerprint(run: Path) -> dict[str, str]:
    """The bytes of the run's record: .hydra/ and the checkpoint."""
    files = sorted((run / ".hydra").iterdir()) + [run / "checkpoints" / "last.pth"]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished 2-step run (train.lr=0.001, train.batch_size=2); returns (run dir, datasets dir)."""
    base = tmp_path_factory.mktemp("run_directory")
    run, datasets = base / "run", base / "datasets"
    done = subprocess.run(train_cmd(run), env=env_for(datasets), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, datasets


def test_a_run_records_its_config_in_dot_hydra(tiny_run) -> None:
    run, _ = tiny_run
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert config["train"]["lr"] == 0.001 and config["model"]["name"] == "efficientdet_d0"
    assert "train.lr=0.001" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert (run / ".hydra" / "hydra.yaml").is_file() and not list((run / ".hydra").glob("*.tmp"))
    assert (run / "train.lock").read_text().startswith("pid ")


@pytest.fixture(scope="module")
def refused(tiny_run, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, dict, dict]]:
    """Three refused starts, run at once (each is only a process start): a changed lr and batch size and another
    model on the tiny run, and a start on a directory whose lock another training holds. Each: (result, run dir,
    fingerprint before, fingerprint after)."""
    run, datasets = tiny_run
    # Copies of the run: two starts at once on one directory would meet its lock.
    other_model, locked = (tmp_path_factory.mktemp(name) for name in ("other_model", "locked"))
    for copy in (other_model, locked):
        shutil.copytree(run, copy, dirs_exist_ok=True)
    starts = {"lr": (run, ["train.lr=0.1", "train.batch_size=4"]), "model": (other_model, ["model=efficientdet_lite0"]),
              "locked": (locked, [])}
    before = {name: fingerprint(directory) for name, (directory, _) in starts.items()}
    with open(locked / "train.lock", "a+") as held:  # another training holds the directory
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.seek(0), held.truncate(), held.write(f"pid 4242 host {socket.gethostname()}\n"), held.flush()
        procs = {name: subprocess.Popen(train_cmd(directory, *overrides), env=env_for(datasets), cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name, (directory, overrides) in starts.items()}
        outputs = {name: p.communicate(timeout=300) for name, p in procs.items()}
    results = {name: subprocess.CompletedProcess(p.args, p.returncode, *outputs[name]) for name, p in procs.items()}
    return {name: (results[name], directory, before[name], fingerprint(directory))
            for name, (directory, _) in starts.items()}


def test_resume_with_changed_lr_and_batch_size_is_refused_with_the_diff(refused) -> None:
    done, _, before, after = refused["lr"]
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: ")
    assert "train.batch_size: 2 -> 4" in done.stderr and "train.lr: 0.001 -> 0.1" in done.stderr
    assert "hydra.run.dir=<new dir>" in done.stderr and ".hydra/config.yaml" in done.stderr
    assert after == before


def test_resume_with_another_model_is_refused_in_one_paragraph(refused) -> None:
    done, _, before, after = refused["model"]
    assert done.returncode != 0
    assert done.stderr.startswith("error: this run directory holds an efficientdet_d0 run")
    assert "Missing key" not in done.stderr and "Traceback" not in done.stderr
    message = done.stderr.split("\n  (DENSEKIT_DEBUG=1")[0]  # the error block's closing hint is not the message
    assert "model=efficientdet_d0" in message and len(message.strip().splitlines()) == 1
    assert after == before


def test_second_training_on_a_locked_directory_is_refused_naming_the_owner(refused) -> None:
    done, _, before, after = refused["locked"]
    assert done.returncode != 0 and done.stderr.startswith("error: ")
    assert f"in use by another training (pid 4242 host {socket.gethostname()}" in done.stderr
    assert after == before


def test_resume_with_changed_num_workers_is_accepted_and_a_stale_lock_taken_over(tiny_run, tmp_path: Path) -> None:
    source, datasets = tiny_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    (run / "train.lock").write_text("pid 999999 host a-killed-run\n")  # its flock went with its process
    proc = subprocess.Popen(train_cmd(run, "train.num_workers=1", "eval.batch_size=2"), env=env_for(datasets),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert ("with changed settings that may change on resume: train.num_workers: 0 -> 1; eval.batch_size: 8 -> 2"
            in out)
    assert f"resumed from {run / 'checkpoints' / 'last.pth'} at step 2 / 2" in out
    assert (run / "train.lock").read_text() == f"pid {proc.pid} host {socket.gethostname()}\n"
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["train"]["num_workers"] == 1
    assert torch.load(run / "checkpoints" / "last.pth", weights_only=True)["step"] == 2


def test_the_classification_of_keys() -> None:
    old = {"device": "cpu", "train": {"lr": 0.1, "num_workers": 2, "seed": 0}, "model": {"num_classes": 5}}
    new = {"device": "cuda", "train": {"lr": 0.1, "num_workers": 4, "seed": 1}, "model": {"num_classes": 90}}
    diff = config_diff(old, new)
    assert diff == {"device": ("cpu", "cuda"), "train.num_workers": (2, 4), "train.seed": (0, 1)}
    assert {"device", "train.num_workers", "eval"} <= set(RESUMABLE_KEYS)
    assert not {"train.lr", "train.batch_size", "train.seed", "train.max_steps", "model", "data"} & set(RESUMABLE_KEYS)


def test_lock_in_process(tmp_path: Path) -> None:
    with RunDirLock(tmp_path):
        with pytest.raises(RunDirError, match=f"pid {os.getpid()} host"):
            RunDirLock(tmp_path).acquire()
    RunDirLock(tmp_path).acquire().release()  # released: free again
