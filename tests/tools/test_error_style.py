"""Every tool reports a user's mistake the same way: one ``error:`` block on stderr, exit code 2, no traceback
(densekit.cli.errors); ``DENSEKIT_DEBUG=1`` shows the traceback; a bug keeps its traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from densekit.cli.errors import EXIT_USER_ERROR, UsageError, describe, run_tool

ROOT = Path(__file__).resolve().parents[2]
TINY_DATA = ["data.num_train=2", "data.num_val=2", "data.image_size=64"]
MISSING = "/nowhere/weights.pth"

# (tool, overrides) -> what the error block must say. Missing weights file, then a typo'd key, per tool.
CASES: dict[str, tuple[list[str], list[str]]] = {
    "train missing weights": (["tools/train.py", f"weights={MISSING}", *TINY_DATA, "train.num_workers=0"],
                              [f"checkpoint file not found: {MISSING}"]),
    "train typo": (["tools/train.py", "train.lrr=0.1"],
                   ["unknown config key train.lrr (from the override train.lrr=0.1); did you mean train.lr?",
                    "valid keys under train: "]),
    "eval missing weights": (["tools/eval.py", f"weights={MISSING}", *TINY_DATA],
                             [f"checkpoint file not found: {MISSING}"]),
    "eval typo": (["tools/eval.py", "data.trian_split=val"],
                  ["unknown config key data.trian_split", "did you mean data.train_split?"]),
    "eval unknown model": (["tools/eval.py", "model=efficientdet_d9"],
                           ["unknown model=efficientdet_d9; did you mean model=efficientdet_d7?",
                            "available: efficientdet_coatnet0, efficientdet_d0"]),
    "predict missing weights": (["tools/predict.py", f"weights={MISSING}", "input=photo.png"],
                                [f"checkpoint file not found: {MISSING}"]),
    "predict typo": (["tools/predict.py", "predict.score_treshold=0.5"],
                     ["unknown config key predict.score_treshold", "did you mean predict.score_threshold?"]),
    "export missing weights": (["tools/export.py", f"weights={MISSING}", "export.output=x.onnx"],
                               [f"checkpoint file not found: {MISSING}"]),
    "export typo": (["tools/export.py", "export.formt=onnx"],
                    ["unknown config key export.formt", "did you mean export.format?"]),
    "convert missing input": (["tools/convert_dataset.py", "--from", "voc", "--root", "/nowhere", "--out", "x.json"],
                              ["VOC annotation folder /nowhere/Annotations does not exist"]),
}


def start(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DENSEKIT_DATASETS": str(cwd), **env}
    environment.pop("HYDRA_FULL_ERROR", None)
    environment.setdefault("DENSEKIT_DEBUG", "0")
    hydra = [f"hydra.run.dir={cwd / 'run'}"] if not args[0].endswith("convert_dataset.py") else []
    return subprocess.Popen([sys.executable, str(ROOT / args[0]), *args[1:], *hydra], cwd=cwd, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """Every case run at once (each is a fresh interpreter importing torch: seconds of start-up)."""
    base = tmp_path_factory.mktemp("errors")
    procs = {}
    for name, (args, _) in CASES.items():
        folder = base / name.replace(" ", "_")
        folder.mkdir()
        cv2.imwrite(str(folder / "photo.png"), np.zeros((32, 32, 3), np.uint8))  # predict's input
        procs[name] = start(args, folder)
    done = {}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        done[name] = (proc.returncode, stderr)
    return done


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_block_with_exit_code_2(results: dict[str, tuple[int, str]], case: str) -> None:
    code, stderr = results[case]
    assert code == EXIT_USER_ERROR, stderr[-3000:]
    assert stderr.startswith("error: ") and "Traceback" not in stderr, stderr[-3000:]
    assert "Error executing job" not in stderr and "HYDRA_FULL_ERROR" not in stderr  # Hydra's own report
    for expected in CASES[case][1]:
        assert expected in stderr, stderr


def test_densekit_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = start(["tools/eval.py", f"weights={MISSING}", *TINY_DATA], tmp_path, DENSEKIT_DEBUG="1")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "Traceback" in stderr and "CheckpointError" in stderr


def test_run_tool_reports_user_errors_and_lets_bugs_through(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DENSEKIT_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def mistake() -> None:
        raise UsageError("bench.iters must be >= 1\nset bench.iters=10")

    with pytest.raises(SystemExit) as exc:
        run_tool(mistake)
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: bench.iters must be >= 1\n  set bench.iters=10\n")

    def bug() -> None:
        raise TypeError("unsupported operand")

    with pytest.raises(TypeError):  # a bug is not dressed up as the user's mistake
        run_tool(bug)
    assert "HYDRA_FULL_ERROR" not in os.environ  # run_tool's setting does not leak out of the call


def test_an_os_error_names_its_file() -> None:
    assert describe(FileNotFoundError(2, "No such file or directory", "/data/x.json")) == \
        "No such file or directory: /data/x.json"
    assert describe(OSError("cannot decode image file /data/a.jpg")) == "cannot decode image file /data/a.jpg"
