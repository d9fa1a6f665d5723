"""densekit.train / densekit.evaluate: the commands in-process, for notebooks, returning their metrics."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import densekit
from densekit.config import as_overrides




def test_keyword_overrides_read_as_the_command_line() -> None:
    assert as_overrides({"model": "efficientdet_d0", "train": {"epochs": 3, "amp": None},
                         "data": {"augment": {"scale_range": [0.5, 2.0], "hflip": False}}}) == [
        "model=efficientdet_d0", "train.epochs=3", "train.amp=null", "data.augment.scale_range=[0.5,2.0]",
        "data.augment.hflip=false"]


def test_train_then_evaluate_return_the_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DENSEKIT_DATASETS", str(tmp_path / "datasets"))
    tiny_model = ["model.neck.repeats=1", "model.neck.channels=16", "model.head.repeats=1"]
    data = {"num_train": 8, "num_val": 4, "image_size": 64}
    trained = densekit.train(*tiny_model, "train.max_steps=2", "train.batch_size=4", "train.num_workers=0",
                             "train.backbone_weights=none", run_dir=tmp_path / "run", model="efficientdet_d0", data=data)
    assert "AP" in trained and 0.0 <= trained["AP"] <= 1.0
    assert (tmp_path / "run" / "checkpoints" / "last.pth").is_file() and (tmp_path / "run" / ".hydra").is_dir()

    weights = tmp_path / "run" / "checkpoints" / "last.pth"
    evaluated = densekit.evaluate(*tiny_model, run_dir=tmp_path / "eval", model="efficientdet_d0", data=data,
                                  weights=str(weights), eval={"num_workers": 0})
    assert evaluated["AP"] == pytest.approx(json.loads((tmp_path / "eval" / "metrics.json").read_text())["AP"])
    assert evaluated["AP"] == pytest.approx(trained["AP"], abs=1e-9)  # the same EMA weights on the same images


def test_a_mistake_is_an_exception_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="train.lrr"):
        densekit.train("train.lrr=0.1", run_dir=tmp_path / "run")
