"""tools/convert_dataset.py on tiny VOC and YOLO datasets written in their real on-disk formats: the json loads in
pycocotools and CocoDetection, boxes equal the source, and bad data fails with messages naming the file."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from densekit.cli import convert_dataset  # the code of tools/convert_dataset.py
from densekit.data.coco import CocoDetection

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "convert_dataset.py"


def run_tool(*argv: str | Path) -> str:
    """``main(argv)`` in-process; returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        convert_dataset.main([str(a) for a in argv])
    return out.getvalue()


def tool_error(*argv: str | Path) -> str:
    """The ``error:`` block the tool prints before exiting with 2, less its closing DENSEKIT_DEBUG hint."""
    err = io.StringIO()
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(err):
        run_tool(*argv)
    assert exc.value.code == 2, exc.value.code
    return err.getvalue().split("\n  (DENSEKIT_DEBUG=1")[0]


def write_image(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    assert cv2.imwrite(str(path), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


# ----------------------------------------------------------------------------------------------------- VOC


# image id -> (file under JPEGImages, (H, W), objects as (name, (xmin, ymin, xmax, ymax), difficult))
VOC_IMAGES = {
    "a": ("a.jpg", (48, 64), [("dog", (10.5, 4.25, 40.75, 30.0), 0), ("cat", (1, 1, 64, 48), 1)]),
    "sub/b": ("sub/b.png", (40, 56), [("person", (3, 5, 20, 33.5), 0), ("dog", (30, 2, 55, 39), 0)]),
    "neg": ("neg.jpg", (32, 32), []),
}


def write_voc_xml(path: Path, filename: str, size: tuple[int, int] | None, objects: list) -> None:
    parts = [f"<annotation><folder>VOC</folder><filename>{filename}</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>")
    for name, (x0, y0, x1, y1), difficult in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts) + "</annotation>\n")


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOC"
    for image_id, (file_name, size, objects) in VOC_IMAGES.items():
        write_image(root / "JPEGImages" / file_name, *size)
        write_voc_xml(root / "Annotations" / f"{image_id}.xml", Path(file_name).name, size, objects)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nsub/b\nneg\n")
    (root / "ImageSets" / "Main" / "small.txt").write_text("sub/b\n")
    return root


def _voc_boxes_match(coco: COCO, root: Path, difficult: str) -> None:
    """Every source object appears with bbox [xmin, ymin, xmax - xmin, ymax - ymin] (or is dropped as asked)."""
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    by_file = {im["file_name"]: im for im in coco.dataset["images"]}
    for file_name, size, objects in VOC_IMAGES.values():
        image = by_file[file_name]
        assert (image["height"], image["width"]) == size
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]], iscrowd=None))
        expected = [o for o in objects if not (o[2] and difficult == "drop")]
        assert len(anns) == len(expected)
        for ann, (name, (x0, y0, x1, y1), diff) in zip(anns, expected):
            assert names[ann["category_id"]] == name
            x, y, w, h = ann["bbox"]
            np.testing.assert_allclose([x, y, x + w, y + h], [x0, y0, x1, y1], rtol=0, atol=1e-6)
            assert ann["area"] == pytest.approx(w * h)
            assert ann["iscrowd"] == int(bool(diff) and difficult == "ignore")


def test_voc_converts_to_coco_that_pycocotools_and_cocodetection_load(voc_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "voc.json"
    printed = run_tool("--from", "voc", "--root", voc_root, "--split", "train", "--out", out)
    assert f"wrote {out}" in printed and "3 images (1 without boxes), 4 boxes (1 iscrowd=1)" in printed

    coco = load_coco(out)
    # Names sorted, ids from 1; file names relative to JPEGImages with the sub-folder.
    assert [(c["id"], c["name"]) for c in coco.dataset["categories"]] == [(1, "cat"), (2, "dog"), (3, "person")]
    assert [im["file_name"] for im in coco.dataset["images"]] == ["a.jpg", "sub/b.png", "neg.jpg"]
    _voc_boxes_match(coco, voc_root, difficult="ignore")  # mmdetection's default: difficult -> iscrowd=1

    dataset = CocoDetection(voc_root / "JPEGImages", out, train=True)
    assert dataset.class_names == ["cat", "dog", "person"] and len(dataset) == 3
    image, target = dataset[1]  # sub/b.png: decoded, its size checked against the json
    assert tuple(image.shape[-2:]) == (40, 56)
    src = np.array([o[1] for o in VOC_IMAGES["sub/b"][2]], np.float32)
    np.testing.assert_array_equal(target["boxes"].numpy(), src)  # float32 storage: equal to the rounded source
    assert target["labels"].tolist() == [2, 1]
    assert dataset.annotations(2)[0].shape == (0, 4)  # the negative is kept, with no boxes

    # The ground truth scored as detections gives AP 1 (the crowd 'cat' is ignored, not missed).
    gt = [a for a in coco.dataset["annotations"] if not a["iscrowd"]]
    with contextlib.redirect_stdout(io.StringIO()):
        dets = coco.loadRes([{**a, "score": 1.0} for a in gt])
        evaluator = COCOeval(coco, dets, "bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_voc_difficult_modes_and_class_list(voc_root: Path, tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("person\ndog\ncat\n\n")  # order fixes the ids; a trailing blank line is fine
    for mode in ("keep", "drop"):
        out = tmp_path / f"{mode}.json"
        run_tool("--from", "voc", "--root", voc_root, "--classes", classes, "--first-id", "5",
                 "--difficult", mode, "--out", out)
        coco = load_coco(out)
        assert [(c["id"], c["name"]) for c in coco.dataset["categories"]] == [(5, "person"), (6, "dog"), (7, "cat")]
        _voc_boxes_match(coco, voc_root, difficult=mode)


def test_voc_split_list_and_missing_image_is_skipped(voc_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "small.json"
    run_tool("--from", "voc", "--root", voc_root, "--split", "small", "--out", out)
    assert [im["file_name"] for im in load_coco(out).dataset["images"]] == ["sub/b.png"]
    listed = voc_root / "ImageSets" / "Main" / "small.txt"
    run_tool("--from", "voc", "--root", voc_root, "--split", listed, "--out", out)
    assert [im["file_name"] for im in load_coco(out).dataset["images"]] == ["sub/b.png"]  # a list file by path

    (voc_root / "JPEGImages" / "neg.jpg").unlink()
    printed = run_tool("--from", "voc", "--root", voc_root, "--out", out)  # every xml, no list
    assert "skipped 1:" in printed and "neg.xml: no image file" in printed
    assert len(load_coco(out).dataset["images"]) == 2


def test_voc_errors_name_the_file(voc_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "bad.json"
    xml = voc_root / "Annotations" / "a.xml"
    write_voc_xml(xml, "a.jpg", (50, 64), VOC_IMAGES["a"][2])  # the image is 48x64
    message = tool_error("--from", "voc", "--root", voc_root, "--out", out)
    assert str(xml) in message and "50x64" in message and "48x64" in message
    assert not out.exists()

    write_voc_xml(xml, "a.jpg", None, [("bird", (1, 2, 3, 4), 0)])  # no <size>: the image decides
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\nperson\n")
    message = tool_error("--from", "voc", "--root", voc_root, "--classes", classes, "--out", out)
    assert str(xml) in message and "'bird'" in message

    write_voc_xml(xml, "a.jpg", None, [("dog", (30, 2, 20, 9), 0), ("dog", (1, 2, 3, 4), 0)])  # inverted box
    message = tool_error("--from", "voc", "--root", voc_root, "--out", out)
    assert str(xml) in message and "object 1" in message and "inverted" in message
    printed = run_tool("--from", "voc", "--root", voc_root, "--skip-bad", "--out", out)
    assert f"{xml} object 1" in printed
    coco = load_coco(out)
    image = next(im for im in coco.dataset["images"] if im["file_name"] == "a.jpg")
    assert [a["bbox"] for a in coco.imgToAnns[image["id"]]] == [[1.0, 2.0, 2.0, 2.0]]


# ---------------------------------------------------------------------------------------------------- YOLO


# file under images/train -> ((H, W), label lines as (class, cx, cy, w, h)) ; None: no label file (a negative)
YOLO_IMAGES = {
    "a.jpg": ((48, 64), [(0, 0.5, 0.5, 0.25, 0.5), (1, 0.123456789, 0.7, 0.2, 0.3333333333)]),
    "sub/b.png": ((40, 56), [(1, 0.1, 0.9, 0.2, 0.2)]),
    "neg.jpg": ((32, 32), None),
    "empty.jpg": ((30, 20), []),
}


def write_yolo(images: Path, labels: Path) -> None:
    for name, (size, lines) in YOLO_IMAGES.items():
        write_image(images / name, *size)
        if lines is not None:
            label = (labels / name).with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(f"{c} {cx} {cy} {w} {h}\n" for c, cx, cy, w, h in lines))


@pytest.fixture
def yolo_root(tmp_path: Path) -> Path:
    root = tmp_path / "yolo"
    write_yolo(root / "images" / "train", root / "labels" / "train")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  0: car\n  1: traffic light\n")
    return root


def _yolo_boxes_match(coco: COCO) -> None:
    """Inverse conversion of every annotation gives the source's normalised values (checked in pixels)."""
    by_file = {im["file_name"]: im for im in coco.dataset["images"]}
    first_id = min(coco.getCatIds())
    for name, ((H, W), lines) in YOLO_IMAGES.items():
        image = by_file[name]
        assert (image["height"], image["width"]) == (H, W)
        anns = coco.imgToAnns[image["id"]]
        assert len(anns) == len(lines or [])
        for ann, (c, cx, cy, w, h) in zip(anns, lines or []):
            x, y, bw, bh = ann["bbox"]
            assert ann["category_id"] == c + first_id and ann["iscrowd"] == 0
            source = [cx * W, cy * H, w * W, h * H]
            np.testing.assert_allclose([x + bw / 2, y + bh / 2, bw, bh], source, rtol=0, atol=1e-6)


def test_yolo_converts_with_data_yaml_negatives_and_orphans(yolo_root: Path, tmp_path: Path) -> None:
    orphan = yolo_root / "labels" / "train" / "ghost.txt"
    orphan.write_text("0 0.5 0.5 0.1 0.1\n")
    out = tmp_path / "yolo.json"
    printed = run_tool("--from", "yolo", "--root", yolo_root, "--split", "train", "--out", out)
    assert f"{orphan}: no image of this name" in printed
    assert "4 images (2 without boxes), 3 boxes" in printed

    coco = load_coco(out)
    assert [(c["id"], c["name"]) for c in coco.dataset["categories"]] == [(1, "car"), (2, "traffic light")]
    assert sorted(im["file_name"] for im in coco.dataset["images"]) == ["a.jpg", "empty.jpg", "neg.jpg", "sub/b.png"]
    _yolo_boxes_match(coco)

    dataset = CocoDetection(yolo_root / "images" / "train", out, train=False)
    assert dataset.class_names == ["car", "traffic light"]
    index = dataset.image_ids.index(next(im["id"] for im in coco.dataset["images"] if im["file_name"] == "sub/b.png"))
    image, target = dataset[index]
    assert tuple(image.shape[-2:]) == (40, 56) and target["labels"].tolist() == [1]


def test_yolo_flat_folder_with_classes_txt_and_names_list(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    write_yolo(flat, flat)  # labels next to their images
    (flat / "classes.txt").write_text("car\ntraffic light\n")
    out = tmp_path / "flat.json"
    printed = run_tool("--from", "yolo", "--images", flat, "--labels", flat, "--first-id", "0", "--out", out)
    assert "skipped" not in printed  # classes.txt is not an orphan label file
    coco = load_coco(out)
    assert [c["id"] for c in coco.dataset["categories"]] == [0, 1]
    _yolo_boxes_match(coco)

    names = tmp_path / "data.yaml"
    names.write_text("nc: 2\nnames: [car, traffic light]\n")
    run_tool("--from", "yolo", "--images", flat, "--labels", flat, "--classes", names, "--out", out)
    assert [c["name"] for c in load_coco(out).dataset["categories"]] == ["car", "traffic light"]


def test_yolo_errors_name_file_line_and_class(yolo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "bad.json"
    label = yolo_root / "labels" / "train" / "a.txt"
    label.write_text("0 0.5 0.5 0.25 0.5\n\n1 0.5 0.5 0.2\n")
    args = ("--from", "yolo", "--root", yolo_root, "--split", "train", "--out", out)
    message = tool_error(*args)
    assert f"{label}:3" in message and "expected 5 values" in message and not out.exists()

    printed = run_tool(*args, "--skip-bad")
    assert f"{label}:3" in printed
    coco = load_coco(out)
    image = next(im for im in coco.dataset["images"] if im["file_name"] == "a.jpg")
    assert [a["bbox"] for a in coco.imgToAnns[image["id"]]] == [[24.0, 12.0, 16.0, 24.0]]

    label.write_text("0 12 30 20 10\n")  # pixel coordinates instead of normalised ones
    assert f"{label}:1" in tool_error(*args) and "normalised" in tool_error(*args)

    label.write_text("0 0.5 0.5 0.1 0.1\n2 0.5 0.5 0.1 0.1\n")
    message = tool_error(*args, "--skip-bad")  # a wrong class list is never skipped
    assert f"{label}:2" in message and "class id 2 is out of range" in message


def test_cli_subprocess_writes_json(yolo_root: Path, tmp_path: Path) -> None:
    """The command line as a user runs it (one subprocess: importing torch takes seconds on a loaded machine)."""
    out = tmp_path / "cli.json"
    cmd = [sys.executable, str(TOOL), "--from", "yolo", "--root", str(yolo_root), "--split", "train", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and len(json.loads(out.read_text())["images"]) == 4


def test_cli_missing_folder_is_one_clear_message(yolo_root: Path, tmp_path: Path) -> None:
    message = tool_error("--from", "yolo", "--root", yolo_root, "--split", "val", "--out", tmp_path / "x.json")
    assert message == f"error: YOLO image folder {yolo_root / 'images' / 'val'} does not exist"
