"""densekit.config.image_size_arg: the ``image_size=`` override that tools/summary.py, tools/export.py and
benchmarks/benchmark.py share."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from densekit.config import image_size_arg

ROOT = Path(__file__).resolve().parents[1]


def test_none_is_the_models_own_size() -> None:
    assert image_size_arg(None, [512, 640]) == (512, 640)
    assert image_size_arg(None, OmegaConf.create([1024, 2048])) == (1024, 2048)


def test_an_int_is_square_and_a_pair_is_height_width() -> None:
    assert image_size_arg(320, [512, 512]) == (320, 320)
    assert image_size_arg([128, 256], [512, 512]) == (128, 256)
    assert image_size_arg((96, 64), [512, 512]) == (96, 64)
    assert image_size_arg(OmegaConf.create([128, 256]), [512, 512]) == (128, 256)
    assert all(type(n) is int for n in image_size_arg(["128", 256.0], [512, 512]))


@pytest.mark.parametrize("value", [[1, 2, 3], [64], "big", 1.5])
def test_anything_else_is_refused_with_the_value(value: object) -> None:
    with pytest.raises(ValueError, match=r"image_size must be an int or \[H, W\], got"):
        image_size_arg(value, [512, 512])


def test_the_summary_tool_reports_a_bad_size_in_one_line() -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))  # this checkout's densekit, not an installed one
    done = subprocess.run([sys.executable, "tools/summary.py", "image_size=[1,2,3]"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "image_size must be an int or [H, W], got [1, 2, 3]" in done.stderr and "Traceback" not in done.stderr
