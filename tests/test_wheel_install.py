"""``pip install`` of densekit's wheel works outside the checkout (issue 24).

The wheel is built from this working tree and installed into a folder of its own, put first on ``PYTHONPATH``; every
command runs from a temporary folder, so neither the checkout's ``conf/`` nor its editable densekit can stand in for
the wheel's. There, ``densekit train`` trains on the embedded synthetic dataset, ``densekit predict`` predicts with
that checkpoint, ``densekit.create_model`` builds a packaged model, and ``$DENSEKIT_CONF`` adds a user's model and
data YAMLs to the packaged ones, for Python and for the tools alike.

Offline: the wheel is built without build isolation (setuptools from this environment) and installed without
dependencies (they are this environment's).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGED_CONF = ROOT / "densekit" / "conf"
TINY_TRAIN = ["model=efficientdet_lite0", "data.num_train=8", "data.num_val=4", "data.image_size=128",
              "train.batch_size=4", "train.max_steps=2", "train.num_workers=0"]

# A user's folder for DENSEKIT_CONF: a model and a data YAML of their own, each extending a packaged one.
USER_MODEL = """# a Lite0 with one BiFPN and head repeat
defaults: [_efficientdet_schema, _self_]
name: my_lite0
image_size: [320, 320]
backbone: {name: tf_efficientnet_lite0}
neck: {channels: 64, repeats: 1, fusion: sum}
head: {repeats: 1}
act: relu6
"""
USER_DATA = """# the embedded synthetic shapes, fewer and smaller
defaults: [synthetic, _self_]
name: tiny_shapes
num_train: 8
num_val: 4
image_size: 128
"""

# Run by the installed wheel's interpreter setup: the wheel's densekit, its packaged models and the user's.
CREATE_MODELS = """
import sys
import densekit
assert densekit.__file__.startswith(sys.argv[1]), densekit.__file__
densekit.create_model("efficientdet_d0")
names = densekit.list_models()
assert "my_lite0" in names and "efficientdet_d0" in names, names
assert densekit.create_model("my_lite0").config.neck.repeats == 1
print("created")
"""


@dataclass(frozen=True)
class Installed:
    """The built wheel, the folder it is installed in, and a scratch folder outside the checkout."""

    wheel: Path
    site: Path
    tmp: Path

    @property
    def command(self) -> str:
        return str(self.site / "bin" / "densekit")

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """``args`` from a temporary folder, with the wheel first on the path (``env`` added to the environment)."""
        work = self.tmp / "work"
        work.mkdir(exist_ok=True)
        base = {k: v for k, v in os.environ.items() if k not in ("DENSEKIT_CONF", "PYTHONPATH")}
        base.update(PYTHONPATH=str(self.site), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                    DENSEKIT_DATASETS=str(self.tmp / "datasets"), **env)
        return subprocess.run(list(args), cwd=work, env=base, capture_output=True, text=True, timeout=300)


def pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "-q"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the wheel (a second or two) and install it with ``pip install --target``."""
    tmp = tmp_path_factory.mktemp("wheel")
    # setuptools builds in the source folder (build/, densekit.egg-info): a copy of what the wheel is made of keeps
    # the checkout clean and concurrent runs apart.
    src = tmp / "src"
    shutil.copytree(ROOT / "densekit", src / "densekit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip("wheel", "--no-build-isolation", "-w", str(tmp / "dist"), str(src))
    (wheel,) = (tmp / "dist").glob("densekit-*.whl")
    pip("install", "--target", str(tmp / "site"), str(wheel))
    return Installed(wheel, tmp / "site", tmp)


@pytest.fixture(scope="module")
def user_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("user_conf")
    for path, text in (("model/my_lite0.yaml", USER_MODEL), ("data/tiny_shapes.yaml", USER_DATA)):
        (folder / path).parent.mkdir(exist_ok=True)
        (folder / path).write_text(text)
    return folder


def test_the_wheel_carries_every_config_and_the_command(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    configs = {f"densekit/conf/{p.relative_to(PACKAGED_CONF).as_posix()}" for p in PACKAGED_CONF.rglob("*.yaml")}
    assert len(configs) > 40 and configs <= names, sorted(configs - names)
    assert {"densekit/cli/train.py", "densekit/benchmarks/benchmark.py", "densekit/__main__.py"} <= names
    (entry_points,) = installed.site.glob("densekit-*.dist-info/entry_points.txt")
    assert "densekit = densekit.cli.command:main" in entry_points.read_text()


def test_train_then_predict_with_the_installed_command(installed: Installed) -> None:
    run, predictions = installed.tmp / "run", installed.tmp / "predict"
    train = installed.run(installed.command, "train", *TINY_TRAIN, f"hydra.run.dir={run}")
    assert train.returncode == 0, train.stderr[-3000:]
    assert "AP50" in train.stdout and (run / "checkpoints" / "last.pth").is_file()
    assert (run / "train.log").is_file()  # Hydra's job is still named "train", as with python tools/train.py

    image = next((installed.tmp / "datasets").rglob("*.jpg"))  # a picture of the dataset the run generated
    predict = installed.run(installed.command, "predict", "model=efficientdet_lite0", f"input={image}",
                            f"weights={run / 'checkpoints' / 'last.pth'}", f"hydra.run.dir={predictions}")
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert len(json.loads((predictions / "predictions.json").read_text())["images"]) == 1


def test_create_model_and_a_users_configs_from_the_installed_package(installed: Installed, user_conf: Path) -> None:
    created = installed.run(sys.executable, "-c", CREATE_MODELS, str(installed.site), DENSEKIT_CONF=str(user_conf))
    assert created.returncode == 0 and "created" in created.stdout, created.stderr[-3000:]

    # A tool composes its config from the user's YAMLs too (--cfg job: print it, run nothing).
    composed = installed.run(installed.command, "train", "--cfg", "job", "model=my_lite0", "data=tiny_shapes",
                             DENSEKIT_CONF=str(user_conf))
    assert composed.returncode == 0, composed.stderr[-3000:]
    assert "name: my_lite0" in composed.stdout and "name: tiny_shapes" in composed.stdout
    assert "num_train: 8" in composed.stdout and "synthetic_shapes" in composed.stdout  # the packaged data's root
