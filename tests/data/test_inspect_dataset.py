"""densekit inspect (densekit/cli/inspect_dataset.py, densekit/data/inspection/): a tiny COCO-format dataset with one
planted problem of each kind lists each of them, in-process and through tools/inspect_dataset.py (strict: exit code
2); a segmentation folder with a label value outside its classes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from densekit.cli.inspect_dataset import inspect_dataset
from densekit.config import register_configs
from densekit.data.inspection import DatasetProblems
from densekit.modeling.build import config_dir

ROOT = Path(__file__).resolve().parents[2]


def _image(path: Path, h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 190, (h, w, 3), dtype=np.uint8)
    cv2.rectangle(image, (10, 10), (w // 2, h // 2), (200, 40, 40), -1)
    cv2.imwrite(str(path), image)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six 120x160 (HxW) images, three categories; planted: an image without boxes (empty.png), a byte copy of
    a.png (copy.png), a 3x3 box (annotation 30), a box wholly outside its image (annotation 40), a json size of
    100x100 for a 120x160 file (wrong_size.png), a category without boxes (id 9, "ghost")."""
    root = tmp_path_factory.mktemp("planted")
    images = root / "images"
    images.mkdir()
    names = ["a.png", "empty.png", "copy.png", "tiny.png", "outside.png", "wrong_size.png"]
    for i, name in enumerate(names):
        if name != "copy.png":
            _image(images / name, 120, 160, seed=i)
    shutil.copy(images / "a.png", images / "copy.png")
    coco_images = [{"id": i + 1, "file_name": n, "height": 120, "width": 160} for i, n in enumerate(names)]
    coco_images[5].update(height=100, width=100)
    boxes = {  # annotation id: (image id, category id, bbox)
        10: (1, 1, [10, 10, 70, 50]), 11: (1, 3, [80, 40, 60, 60]),
        20: (3, 1, [10, 10, 70, 50]),
        30: (4, 1, [100, 100, 3, 3]), 31: (4, 3, [10, 10, 60, 40]),
        40: (5, 1, [200, 10, 40, 40]), 41: (5, 3, [20, 20, 50, 50]),
        50: (6, 1, [10, 10, 50, 50]),
    }
    annotations = [{"id": a, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                   for a, (i, c, b) in boxes.items()]
    categories = [{"id": 1, "name": "thing"}, {"id": 3, "name": "other"}, {"id": 9, "name": "ghost"}]
    ann_file = root / "train.json"
    ann_file.write_text(json.dumps({"images": coco_images, "annotations": annotations, "categories": categories}))
    return {"images": images, "annotations": ann_file}


def _compose(*overrides: str) -> DictConfig:
    register_configs()
    with initialize_config_dir(str(config_dir()), version_base=None):
        return compose("inspect", overrides=list(overrides))


def _detection_overrides(planted: dict[str, Path]) -> list[str]:
    return ["model=efficientdet_lite0", "data=custom", f"data.train_images={planted['images']}",
            f"data.train_annotations={planted['annotations']}", "data.image_size=128", "inspect.samples=4"]


def test_every_planted_problem_is_listed(planted: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    report = inspect_dataset(_compose(*_detection_overrides(planted)), run_dir=tmp_path)
    found = {(p.kind, p.message) for p in report.problems}

    def listed(kind: str, *words: str) -> bool:
        return any(k == kind and all(w in m for w in words) for k, m in found)

    assert listed("empty_image", "empty.png", "image id 2")
    assert listed("duplicate_file", "a.png", "copy.png", "same content")
    assert listed("small_box", "annotation 30", "tiny.png")
    assert listed("outside_box", "annotation 40", "outside.png", "entirely outside")
    assert listed("size_mismatch", "wrong_size.png", "120x160", "100x100")
    assert listed("class_without_boxes", "ghost", "category 9")
    # Nothing else: the planted images' other boxes are fine (the anchor recall of these few boxes may be low).
    assert {k for k, _ in found} - {"low_anchor_recall"} == {
        "empty_image", "duplicate_file", "small_box", "outside_box", "size_mismatch", "class_without_boxes"}

    summary = capsys.readouterr().out
    assert summary.startswith("densekit inspect: custom, split train:")
    for section in ("classes", "boxes", "sizes", "anchors", "problems", "report"):
        assert any(line.startswith(section) for line in summary.splitlines()), section
    out = tmp_path / "inspect"
    for name in ("summary.txt", "problems.txt", "report.json", "classes.png", "boxes_per_image.png",
                 "box_sizes.png", "aspect_ratios.png", "samples.jpg"):
        assert (out / name).stat().st_size > 0, name
    assert cv2.imread(str(out / "samples.jpg")) is not None
    numbers = json.loads((out / "report.json").read_text())
    by_name = {c["name"]: c for c in numbers["classes"]}
    assert by_name["thing"]["boxes"] == 4 and by_name["ghost"]["boxes"] == 0  # the outside box is not a box
    assert numbers["boxes_per_image"]["0"] == 1 and numbers["anchors"]["boxes"] == 7
    assert len((out / "problems.txt").read_text().splitlines()) == len(report.problems)


def test_strict_fails_with_the_problems_unless_their_kinds_are_allowed(planted: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    overrides = [*_detection_overrides(planted), "inspect.strict=true", f"inspect.out={tmp_path / 'report'}"]
    with pytest.raises(DatasetProblems, match="inspect.strict=true") as raised:
        inspect_dataset(_compose(*overrides))
    assert "empty_image (1)" in str(raised.value) and str(tmp_path / "report" / "problems.txt") in str(raised.value)
    every = ("empty_image,duplicate_file,small_box,outside_box,size_mismatch,class_without_boxes,"
             "low_anchor_recall")
    inspect_dataset(_compose(*overrides, f"inspect.allow=[{every}]"))  # nothing left to fail on


def test_the_tool_exits_with_2_in_strict_mode(planted: dict[str, Path], tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "tools" / "inspect_dataset.py"), *_detection_overrides(planted),
           "inspect.strict=true", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith("error: inspect.strict=true"), done.stderr[-3000:]
    assert "outside_box (1)" in done.stderr and "Traceback" not in done.stderr
    assert "anchors" in done.stdout and (tmp_path / "inspect" / "problems.txt").is_file()


def test_a_label_value_outside_the_classes_is_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = tmp_path / "img", tmp_path / "ann"
    images.mkdir()
    labels.mkdir()
    for i in range(3):
        _image(images / f"{i}.png", 32, 48, seed=i)
        label = np.zeros((32, 48), np.uint8)
        label[:, 24:] = 1
        label[:4] = 255  # ignore: allowed
        if i == 2:
            label[10:12, 10:12] = 7  # three classes: 7 is none of them
        cv2.imwrite(str(labels / f"{i}.png"), label)
    cfg = _compose("model=eseg_lite_s", "data=custom_seg", "data.classes=[sky,road,car]",
                   f"data.train_images={images}", f"data.train_labels={labels}", "inspect.samples=3")
    report = inspect_dataset(cfg, run_dir=tmp_path)
    kinds = {p.kind: p.message for p in report.problems}
    assert set(kinds) == {"label_values", "class_without_pixels"}
    assert "2.png" in kinds["label_values"] and "[7]" in kinds["label_values"]
    assert "car" in kinds["class_without_pixels"]
    shares = {c["name"]: c["share"] for c in json.loads((tmp_path / "inspect" / "report.json").read_text())["classes"]}
    assert shares["sky"] == pytest.approx(0.5) and shares["car"] == 0  # counted over the two valid labels
    assert "class_pixels.png" in capsys.readouterr().out
    assert (tmp_path / "inspect" / "samples.jpg").is_file()
