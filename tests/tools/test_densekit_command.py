"""The ``densekit`` command (densekit.cli.command) and ``$DENSEKIT_CONF``, in-process: the help lists every command
and model, a command's ``--help`` is its Hydra help, a mistyped command gets the closest one, and a user's config
folder adds to (and may shadow) the packaged configs, or names the variable when it does not exist.
The installed wheel runs the same commands from outside the checkout: tests/test_wheel_install.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import densekit
from densekit.cli.command import COMMANDS, command_words, main
from densekit.modeling.build import config_dir, load_model_config

SHADOWING_LITE0 = """# the user's efficientdet_lite0: one BiFPN repeat
defaults: [_efficientdet_schema, _self_]
name: efficientdet_lite0
neck: {repeats: 1}
"""
OWN_MODEL = """defaults: [_segmenter_schema, _self_]
name: my_segmenter
"""


@pytest.fixture(autouse=True)
def keep_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command sets sys.argv for its tool, as its script would have it; pytest's is restored afterwards."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.delenv("DENSEKIT_CONF", raising=False)


@pytest.fixture
def user_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for path, text in (("model/efficientdet_lite0.yaml", SHADOWING_LITE0), ("model/my_segmenter.yaml", OWN_MODEL)):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text(text)
    monkeypatch.setenv("DENSEKIT_CONF", str(tmp_path))
    return tmp_path


def test_help_lists_every_command_and_every_model(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()[0] in COMMANDS]
    assert listed == list(COMMANDS)  # one line each, in the table's order
    assert all(name in out for name in densekit.list_models())


def test_a_commands_help_is_its_hydra_help() -> None:
    # A subprocess, as users run it: Hydra in-process would leave its logging handlers on pytest's captured streams.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "densekit", "summary", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("summary is powered by Hydra."), done.stderr[-2000:]
    assert "efficientdet_d0" in done.stdout and "image_size" in done.stdout  # its config groups and keys


def test_a_mistyped_command_names_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["trian", "model=efficientdet_d0"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("error: unknown command 'trian'; did you mean train?")


def test_a_next_command_is_worded_as_the_running_one_was_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a tool tells the user to run next (train's evaluation command) starts as the user started the tool."""
    monkeypatch.setattr(sys, "argv", ["densekit train", "model=efficientdet_d0"])
    assert command_words("eval") == ("densekit", "eval")
    monkeypatch.setattr(sys, "argv", ["tools/train.py", "model=efficientdet_d0"])
    assert command_words("eval") == ("python", Path("tools/eval.py"))
    assert command_words("convert") == ("python", Path("tools/convert_dataset.py"))


def test_user_configs_add_to_the_packaged_ones_and_shadow_them(user_conf: Path) -> None:
    assert {"my_segmenter", "efficientdet_lite0", "efficientdet_d0"} <= set(densekit.list_models())
    assert "my_segmenter" in densekit.list_models(arch="segmenter")
    assert load_model_config("efficientdet_lite0").neck.repeats == 1  # the user's file first
    assert load_model_config("efficientdet_d0").neck.repeats == 3  # the packaged one otherwise
    assert config_dir() == Path(densekit.__file__).parent / "conf"


def test_the_help_lists_the_users_models_too(user_conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    assert "my_segmenter" in capsys.readouterr().out


def test_a_missing_user_folder_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DENSEKIT_CONF", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=f"DENSEKIT_CONF={tmp_path / 'nowhere'}: no such folder"):
        densekit.create_model("efficientdet_d0")
    with pytest.raises(SystemExit) as exited:  # a tool: one error block before anything is composed
        main(["summary", "model=efficientdet_d0"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(f"error: DENSEKIT_CONF={tmp_path / 'nowhere'}: no such folder")
    assert "Traceback" not in err
