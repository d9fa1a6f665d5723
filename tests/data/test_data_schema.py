"""Data configs have a schema per dataset layout: an unknown key, in a data YAML or a ``+data.<key>=`` override, is
refused with where it came from, its closest valid key and the valid keys; every shipped ``conf/data`` YAML passes."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from densekit.config import CocoRootDataConfig
from densekit.modeling.build import config_dir
from densekit.tasks import DATA_LAYOUTS, TASKS, DataLayout, check_data_keys, data_layout, get_task

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {"coco": "coco", "custom": "coco_files", "synthetic": "synthetic_coco", "cityscapes": "cityscapes",
           "custom_seg": "seg_folder", "synthetic_cityscapes": "synthetic_cityscapes"}
TYPO_YAML = """\
name: mine
format: coco
train_images: /d/img
train_anotations: /d/train.json
augment:
  hflip: 0.5
  scale_rnage: [0.5, 1.5]
"""


def shipped(name: str, *overrides: str) -> Any:
    """``conf/data/<name>.yaml`` as Hydra composes it (its defaults list included)."""
    with initialize_config_dir(str(config_dir()), version_base=None):
        return compose(overrides=[f"+data={name}", *overrides]).data


def leaves(node: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        if isinstance(value, Mapping):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_every_shipped_data_yaml_has_a_data_yaml_in_this_test() -> None:
    assert sorted(p.stem for p in (config_dir() / "data").glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", list(SHIPPED))
def test_every_shipped_data_yaml_passes_and_its_layout_schema_has_its_values(name: str) -> None:
    data = shipped(name)
    layout = data_layout(data)
    assert layout.name == SHIPPED[name]
    check_data_keys(data)
    schema = dict(leaves(OmegaConf.to_container(OmegaConf.structured(layout.schema))))
    given = dict(leaves(OmegaConf.to_container(data, resolve=False)))
    # The schema's defaults are the shipped YAML's values (name and format have none: each YAML sets its own).
    assert {k: v for k, v in given.items() if k not in ("name", "format")} == {k: schema[k] for k in given
                                                                                if k not in ("name", "format")}


def test_a_typo_in_a_data_yaml_is_refused_naming_the_close_match_and_the_valid_keys(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text(TYPO_YAML)
    cfg = OmegaConf.create({"data": OmegaConf.load(tmp_path / "mine.yaml"), "model": {"arch": "efficientdet"}})
    with pytest.raises(ValueError) as err:
        get_task(cfg)
    lines = str(err.value).splitlines()
    assert lines[0] == "unknown data key data.train_anotations (from data=mine); did you mean data.train_annotations?"
    assert lines[1] == ("unknown data key data.augment.scale_rnage (from data=mine); "
                        "did you mean data.augment.scale_range?")
    assert lines[2].startswith("valid keys of a data.format=coco dataset laid out as coco_files (")
    assert lines[3].startswith("  data: augment, corruption, corruption_severity, decoder, exif_orientation, format, ")
    assert lines[4] == "  data.augment: color_jitter, hflip, scale_range"


def test_a_key_of_another_layout_is_refused() -> None:
    """``data.root`` is read by the COCO tree under a root, not by a dataset given file by file."""
    with pytest.raises(ValueError, match="unknown data key data.root .*\n.*laid out as coco_files"):
        check_data_keys(shipped("custom", "+data.root=/data/coco"))
    with pytest.raises(ValueError, match=r"data.num_trian .*did you mean data.num_train\?"):
        check_data_keys(shipped("synthetic_cityscapes", "+data.num_trian=3"))


def test_the_tools_name_the_yaml_file_or_the_override(tmp_path: Path) -> None:
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "mine.yaml").write_text(TYPO_YAML)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DENSEKIT_CONF": str(tmp_path / "conf"),
           "DENSEKIT_DATASETS": str(tmp_path), "DENSEKIT_DEBUG": "0"}
    env.pop("HYDRA_FULL_ERROR", None)
    runs = {case: subprocess.Popen([sys.executable, str(ROOT / "tools" / "eval.py"), *args,
                                    f"hydra.run.dir={tmp_path / case}"],
                                   cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for case, args in {"yaml": ["data=mine"], "override": ["+data.num_trian=3"]}.items()}
    stderr = {case: run.communicate(timeout=300)[1] for case, run in runs.items()}
    assert all(run.returncode == 2 for run in runs.values()), stderr
    yaml_file = tmp_path / "conf" / "data" / "mine.yaml"
    assert stderr["yaml"].startswith(f"error: unknown data key data.train_anotations (from data=mine, {yaml_file}); "
                                     "did you mean data.train_annotations?"), stderr["yaml"]
    assert stderr["override"].startswith("error: unknown data key data.num_trian (from the override "
                                         "+data.num_trian=3); did you mean data.num_train?"), stderr["override"]
    assert "\n    data: augment, corruption, " in stderr["override"]


@pytest.fixture
def layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """DATA_LAYOUTS as it is, restored after the test whatever it registered."""
    monkeypatch.setattr(DATA_LAYOUTS, "_entries", dict(DATA_LAYOUTS._entries))


def test_a_second_registration_of_a_layout_is_refused(layouts: None) -> None:
    again = DataLayout("coco", "coco", "COCO again", CocoRootDataConfig, selects=lambda d: True, build=print)
    with pytest.raises(KeyError, match="data layout 'coco' is registered twice"):
        DATA_LAYOUTS.register(again.name)(again)


def test_layouts_of_one_format_that_overlap_are_a_bug_named_at_lookup(layouts: None) -> None:
    greedy = DataLayout("coco_everything", "coco", "any COCO", CocoRootDataConfig, selects=lambda d: True, build=print)
    DATA_LAYOUTS.register(greedy.name)(greedy)
    with pytest.raises(RuntimeError, match=r"data.format 'coco': 2 of its layouts \(coco_files, synthetic_coco, coco, "
                                           r"coco_everything\) select data=synthetic; exactly one must"):
        data_layout(shipped("synthetic"))


def test_every_task_format_has_layouts_and_every_layout_a_task() -> None:
    layout_formats = {layout.format for layout in DATA_LAYOUTS.values()}
    task_formats = {fmt for task in TASKS.values() for fmt in task.data_formats}
    assert layout_formats == task_formats == {"coco", "cityscapes", "seg_folder"}
