"""One task per data format and per arch: a second one is refused at registration instead of replacing the first."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from densekit.tasks import TASKS, get_task, task_of_model
from densekit.tasks.detection import DetectionTask


class _OtherCocoTask(DetectionTask):
    name = "other_detection"
    arch = "other_arch"
    data_formats = ("my_format", "coco")


class _OtherArchTask(DetectionTask):
    name = "other_arch_task"
    arch = "efficientdet"
    data_formats = ("my_format",)


@pytest.fixture
def tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """TASKS as it is, restored after the test whatever it registered."""
    monkeypatch.setattr(TASKS, "_entries", dict(TASKS._entries))


def test_a_second_task_for_the_coco_format_is_refused_naming_both(tasks: None) -> None:
    with pytest.raises(KeyError, match="task 'other_detection' cannot be registered: task 'detection' already serves "
                                       "data_formats 'coco'"):
        TASKS.register(_OtherCocoTask.name)(_OtherCocoTask())
    coco = OmegaConf.create({"data": {"format": "coco"}, "model": {"arch": "efficientdet"}})
    assert get_task(coco).name == "detection"


def test_a_second_task_for_an_arch_is_refused_naming_both(tasks: None) -> None:
    with pytest.raises(KeyError, match="task 'other_arch_task' cannot be registered: task 'detection' already serves "
                                       "arch 'efficientdet'"):
        TASKS.register(_OtherArchTask.name)(_OtherArchTask())
    assert task_of_model(OmegaConf.create({"name": "m", "arch": "efficientdet"})).name == "detection"


def test_lookups_by_format_and_arch() -> None:
    assert task_of_model(OmegaConf.create({"name": "m", "arch": "segmenter"})).name == "segmentation"
    known = r"\['cityscapes', 'coco', 'seg_folder'\]"
    with pytest.raises(ValueError, match=rf"data.format 'voc' is unknown; expected one of {known}"):
        get_task(OmegaConf.create({"data": {"format": "voc"}, "model": {"arch": "efficientdet"}}))
    with pytest.raises(ValueError, match=r"no task trains arch 'yolo'; known: \['efficientdet', 'segmenter'\]"):
        task_of_model(OmegaConf.create({"name": "m", "arch": "yolo"}))
