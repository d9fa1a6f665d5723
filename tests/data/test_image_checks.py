"""The image check before training (densekit/data/checks.py): every problem of a real photo set (a missing, empty or
garbage file, a size the json does not give, an EXIF-rotated photo, a broken label) in one error before the first
step; data.skip_unreadable=true leaves the unreadable ones out instead, in training and in evaluation."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from densekit.data.checks import DataError, DatasetFiles, check_images, find_problems, is_skipped
from densekit.data.coco import CocoDetection
from densekit.data.seg_folder import SegmentationFolder
from densekit.tasks import get_task

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=efficientdet_d0", "model.neck.repeats=1", "model.neck.channels=16", "model.head.repeats=1",
        "data=custom", "data.image_size=64", "train.max_steps=2", "train.batch_size=2", "train.lr=0.001",
        "train.num_workers=0", "train.backbone_weights=none", "train.eval_every_epochs=0"]


def copy_coco(custom_coco: dict, tmp_path: Path) -> dict:
    """A copy of the session's custom COCO dataset that a test may break."""
    shutil.copytree(custom_coco["images"], tmp_path / "images")
    for split in ("train", "val"):
        shutil.copy(custom_coco[split], tmp_path / f"{split}.json")
    return {"images": tmp_path / "images", "train": tmp_path / "train.json", "val": tmp_path / "val.json"}


def image_file(paths: dict, split: str, index: int) -> Path:
    return paths["images"] / json.loads(paths[split].read_text())["images"][index]["file_name"]


def cut_before_scan(path: Path) -> None:
    """Keep a JPEG's header (its size, tables) and drop its image data: the header reads, the pixels do not."""
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xff\xda")])


def coco(paths: dict, split: str, **kwargs) -> CocoDetection:
    return CocoDetection(paths["images"], paths[split], train=split == "train", **kwargs)


def train_cmd(paths: dict, run: Path, *overrides: str) -> list[str]:
    data = [f"data.{split}_{kind}={paths[key]}" for split in ("train", "val")
            for kind, key in (("images", "images"), ("annotations", split))]
    return [sys.executable, str(ROOT / "tools" / "train.py"), *TINY, *data, *overrides, f"hydra.run.dir={run}"]


def test_every_unusable_image_is_named_in_one_error(custom_coco, tmp_path: Path) -> None:
    paths = copy_coco(custom_coco, tmp_path)
    missing, empty, garbage = image_file(paths, "train", 3), image_file(paths, "val", 0), image_file(paths, "val", 1)
    missing.unlink()
    empty.write_bytes(b"")
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    resized = image_file(paths, "val", 2)
    Image.open(resized).resize((50, 40)).save(resized, format="JPEG")  # the json still says the old size
    files = [coco(paths, "train").listed_files("train"), coco(paths, "val").listed_files("val")]
    with pytest.raises(DataError) as raised:
        check_images(files)
    message = str(raised.value)
    assert message.startswith("4 of 22 images cannot be used")
    assert f"train: image file {missing} does not exist" in message
    assert f"val: image file {empty} is empty (0 bytes)" in message
    assert f"cannot decode image file {garbage}" in message
    assert f"image file {resized} is 40x50 (HxW) but {paths['val']} says" in message
    assert "data.skip_unreadable=true to train and evaluate without the 3 unreadable ones" in message
    # With the switch, the unreadable files are left out; a size the json does not give is still refused.
    with pytest.raises(DataError, match="leaves out unreadable files only") as raised:
        check_images(files, skip_unreadable=True)
    assert str(raised.value).startswith("1 of 22") and str(resized) in str(raised.value)


def test_the_size_check_reads_the_exif_frame(custom_coco, tmp_path: Path) -> None:
    paths = copy_coco(custom_coco, tmp_path)
    photo = image_file(paths, "val", 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees for display: the displayed frame is the json's, transposed
    Image.open(photo).save(photo, format="JPEG", exif=exif.tobytes())
    problems = find_problems(coco(paths, "val").listed_files("val"))
    assert len(problems) == 1 and not problems[0].unreadable
    assert "the json describes the stored frame; if the boxes were drawn on it, set data.exif_orientation=false" in (
        problems[0].message)
    assert find_problems(coco(paths, "val", exif=False).listed_files("val")) == []  # the stored frame: as the json


def test_a_long_list_is_cut_and_counted(tmp_path: Path) -> None:
    files = DatasetFiles("val", [tmp_path / f"{i}.jpg" for i in range(25)])
    message = str(pytest.raises(DataError, check_images, [files]).value)
    assert message.count("does not exist") == 10 and "... and 15 more" in message
    assert "without them" in message


def test_the_check_reads_headers_only(tmp_path: Path) -> None:
    """2000 small JPEGs: about 0.1 s on a laptop core (a full decode of 640x480 photos costs ~100x more per file)."""
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "source.jpg")
    data = (tmp_path / "source.jpg").read_bytes()
    paths = [tmp_path / f"{i:04d}.jpg" for i in range(2000)]
    for path in paths:
        path.write_bytes(data)
    start = time.perf_counter()
    assert check_images([DatasetFiles("train", paths)]) == []
    assert time.perf_counter() - start < 5.0  # generous: a shared CI machine; measured 0.1 s


def test_segmentation_images_and_labels_are_checked(custom_seg, tmp_path: Path) -> None:
    shutil.copytree(custom_seg["root"], tmp_path / "seg")
    root = tmp_path / "seg"
    dataset = SegmentationFolder(root / "images" / "train", root / "labels" / "train", ["ground", "block", "disc"])
    empty_label = dataset.label_path(0)
    empty_label.write_bytes(b"")
    small_label = dataset.label_path(1)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(small_label)
    garbage = dataset.image_path(2)
    garbage.write_bytes(b"not an image at all")
    problems = {p.path: p for p in find_problems(dataset.listed_files("train"))}
    assert set(problems) == {dataset.image_path(0), dataset.image_path(1), garbage}
    assert problems[dataset.image_path(0)].message == f"label file {empty_label} is empty (0 bytes)"
    assert problems[dataset.image_path(1)].message.startswith(f"label file {small_label} is 10x10 (HxW) but its image")
    assert not problems[dataset.image_path(1)].unreadable and problems[garbage].unreadable


def test_generated_data_is_not_checked() -> None:
    cfg = OmegaConf.create({"data": {"format": "coco", "generate": True}, "model": {"arch": "efficientdet"}})
    assert get_task(cfg).image_files(cfg, dataset=None, split="train") is None  # densekit wrote those files itself


def test_unreadable_images_are_skipped_in_evaluation_and_replaced_in_training(custom_coco, tmp_path: Path) -> None:
    paths = copy_coco(custom_coco, tmp_path)
    cut_before_scan(image_file(paths, "val", 0))
    with pytest.raises(OSError, match=f"cannot decode image file {image_file(paths, 'val', 0)}"):
        coco(paths, "val")[0]
    image, target = coco(paths, "val", unreadable="skip")[0]
    assert is_skipped(target) and target["file"] == str(image_file(paths, "val", 0)) and image.shape == (3, 1, 1)
    _, replaced = coco(paths, "val", unreadable="replace")[0]
    assert not is_skipped(replaced) and replaced["image_id"] == coco(paths, "val").image_ids[1]


@pytest.fixture(scope="module")
def runs(custom_coco, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, dict]]:
    """Two tiny trainings, run at once (mostly process start): ``refused`` on a dataset with a missing train image
    and an empty val image; ``skipping`` with data.skip_unreadable=true on one with an empty val image and a val
    image whose header reads but whose pixels do not. Each: (result, run dir, dataset paths)."""
    base = tmp_path_factory.mktemp("image_check_runs")
    refused, skipping = copy_coco(custom_coco, base / "refused"), copy_coco(custom_coco, base / "skipping")
    image_file(refused, "train", 0).unlink()
    image_file(refused, "val", 0).write_bytes(b"")
    image_file(skipping, "val", 0).write_bytes(b"")  # found by the check before training
    cut_before_scan(image_file(skipping, "val", 1))  # its header is fine: found when the evaluation decodes it
    starts = {"refused": (refused, []), "skipping": (skipping, ["data.skip_unreadable=true"])}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen(train_cmd(paths, base / name / "run", *extra), env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (paths, extra) in starts.items()}
    outputs = {name: proc.communicate(timeout=300) for name, proc in procs.items()}
    return {name: (subprocess.CompletedProcess(proc.args, proc.returncode, *outputs[name]), base / name / "run",
                   starts[name][0]) for name, proc in procs.items()}


def test_a_run_with_unreadable_images_stops_before_its_first_step(runs) -> None:
    done, run, paths = runs["refused"]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: 2 of 22 images cannot be used (every image was checked before training" in done.stderr
    missing, empty = image_file(paths, "train", 0), image_file(paths, "val", 0)
    assert f"image file {missing} does not exist" in done.stderr and f"image file {empty} is empty" in done.stderr
    assert not (run / "checkpoints").exists()  # not one step was trained


def test_with_skip_unreadable_a_run_trains_and_evaluates_the_rest(runs) -> None:
    done, run, paths = runs["skipping"]
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "data.skip_unreadable=true: 1 of 22 images cannot be read and are left out (1 val)" in output
    assert "eval val: 2 of 6 images cannot be read and were not evaluated" in output
    assert "(2 unreadable images not evaluated)" in done.stdout  # the headline says so too
    final = json.loads((run / "metrics.json").read_text())["final"]
    assert final["skipped_images"] == 2 and str(image_file(paths, "val", 1)) in final["skipped_files"]
    assert (run / "checkpoints" / "last.pth").is_file()
