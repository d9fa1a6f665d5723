"""tools/predict.py end to end on real photos (scikit-image's) and a short video written by OpenCV: pictures, an
annotated video and predictions.json, with boxes in original-image pixels equal to running the model by hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data as photos

import densekit
from densekit.data.decode import read_image
from densekit.data.transforms import build_eval_transform
from densekit.tasks.detection import fill_of

ROOT = Path(__file__).resolve().parents[2]
SIZE = 128
TINY = {"neck": {"repeats": 1, "channels": 16}, "head": {"repeats": 1}}
TINY_ARGS = ["model=efficientdet_d0", "model.neck.repeats=1", "model.neck.channels=16", "model.head.repeats=1"]
NAMES = ["cat", "coffee cup", "astronaut"]
THRESHOLD = 0.05


def run_tool(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tools" / "predict.py"), *overrides]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)


def save_rgb(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def detector(tmp_path_factory, randomise) -> tuple[torch.nn.Module, Path]:
    """A tiny random 3-class D0 and a training-style checkpoint of it that records its class names."""
    torch.manual_seed(0)
    model = densekit.create_model("efficientdet_d0", num_classes=3, **TINY).eval()
    randomise(model, seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "last.pth"
    torch.save({"model": model.state_dict(), "config": {"model": {"num_classes": 3, "class_names": NAMES}}}, path)
    return model, path


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    save_rgb(root / "astronaut.jpg", photos.astronaut())  # 512 x 512
    save_rgb(root / "cats" / "chelsea.png", photos.chelsea())  # 300 x 451, in a sub-folder
    save_rgb(root / "coffee.jpg", photos.coffee())  # 400 x 600
    (root / "notes.txt").write_text("not an image, ignored by suffix")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")  # an image by name only: skipped and listed
    return root


def by_hand(model: torch.nn.Module, path: Path) -> np.ndarray:
    """The evaluation transform + the model + division by the scale, as tools/eval.py scores boxes; clipped to the
    photo, empty boxes dropped; rows [x1, y1, x2, y2, score, label]."""
    image = read_image(path)
    tensor, _, _, scale, _ = build_eval_transform(SIZE, **fill_of(model.config.pixel_mean))(image, np.zeros((0, 4)), np.zeros(0))
    with torch.inference_mode():
        det = model(tensor[None])[0]
    h, w = image.shape[:2]
    boxes = (det["boxes"] / scale).numpy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    keep = (det["scores"].numpy() >= THRESHOLD) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return np.column_stack([boxes, det["scores"].numpy(), det["labels"].numpy()])[keep]


def test_folder_of_photos_gives_pictures_and_boxes_in_original_pixels(detector, photo_dir: Path, tmp_path: Path) -> None:
    model, ckpt = detector
    out = tmp_path / "out"
    done = run_tool(f"input={photo_dir}", f"weights={ckpt}", *TINY_ARGS, f"predict.image_size={SIZE}",
                    f"predict.score_threshold={THRESHOLD}", "predict.batch_size=2", f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "predictions.json").read_text())
    assert record["class_names"] == NAMES  # recorded by the checkpoint, not "class i"
    assert [Path(e["file"]).name for e in record["images"]] == ["astronaut.jpg", "chelsea.png", "coffee.jpg"]
    assert [s["file"] for s in record["skipped"]] == [str(photo_dir / "corrupt.jpg")]
    assert "corrupt.jpg" in done.stdout and "3 (1 skipped)" in done.stdout
    for entry in record["images"]:
        photo = read_image(entry["file"])
        assert (entry["height"], entry["width"]) == photo.shape[:2]
        picture = cv2.imread(str(out / entry["picture"]))
        assert picture.shape == photo.shape  # drawn on the original photo
        got = np.array([[*d["bbox"], d["score"], d["label"]] for d in entry["detections"]]).reshape(-1, 6)
        want = by_hand(model, Path(entry["file"]))
        assert len(got) > 0 and len(got) == len(want)
        # BN folding + channels_last change float rounding only: same boxes to 1e-3 relative.
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-2)
        assert (got[:, [0, 2]] <= entry["width"]).all() and (got[:, [1, 3]] <= entry["height"]).all()
        assert all(d["class_name"] == NAMES[d["label"]] for d in entry["detections"])
    assert (out / "pictures" / "cats" / "chelsea.jpg").is_file()
    assert not list(out.rglob(".*.tmp"))


def test_python_predictor_matches_the_tool_inputs(detector, photo_dir: Path) -> None:
    model, ckpt = detector
    predictor = densekit.Predictor("efficientdet_d0", weights=ckpt, image_size=SIZE, score_threshold=THRESHOLD, **TINY)
    path = photo_dir / "coffee.jpg"
    from_path, from_array = predictor([path, read_image(path)])
    want = by_hand(model, path)
    np.testing.assert_allclose(from_path.boxes, want[:, :4], rtol=1e-3, atol=1e-2)
    np.testing.assert_array_equal(from_path.boxes, from_array.boxes)
    assert from_path.names == [NAMES[int(label)] for label in want[:, 5]]
    assert (from_path.height, from_path.width) == (400, 600)


def test_video_gives_an_annotated_video_and_one_entry_per_frame(detector, tmp_path: Path) -> None:
    _, ckpt = detector
    clip = tmp_path / "clip.mp4"
    cat = cv2.resize(cv2.cvtColor(photos.chelsea(), cv2.COLOR_RGB2BGR), (128, 96))
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (128, 96))
    for shift in range(5):
        writer.write(np.roll(cat, 8 * shift, axis=1))
    writer.release()
    out = tmp_path / "out"
    done = run_tool(f"input={clip}", f"weights={ckpt}", *TINY_ARGS, f"predict.image_size={SIZE}",
                    "predict.score_threshold=0.0", "predict.batch_size=2", f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "predictions.json").read_text())
    assert [f["frame"] for f in record["frames"]] == [0, 1, 2, 3, 4]
    assert record["video"]["output"] == "clip_pred.mp4" and record["video"]["fps"] == pytest.approx(10.0)
    for frame in record["frames"]:
        assert (frame["height"], frame["width"]) == (96, 128) and frame["detections"]
        boxes = np.array([d["bbox"] for d in frame["detections"]])
        assert (boxes[:, [0, 2]] <= 128).all() and (boxes[:, [1, 3]] <= 96).all() and (boxes >= 0).all()
    annotated = cv2.VideoCapture(str(out / "clip_pred.mp4"))
    frames = []
    while (ok_frame := annotated.read())[0]:
        frames.append(ok_frame[1])
    assert len(frames) == 5 and frames[0].shape == (96, 128, 3)
    assert not list(out.glob("*.tmp*"))  # the temporary video was renamed, not left behind


def test_segmentation_writes_an_overlay_and_a_label_png_of_the_original_size(photo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_tool(f"input={photo_dir / 'cats' / 'chelsea.png'}", "model=lraspp_mobilenet_v3_small",
                    "model.num_classes=4", "predict.allow_random_weights=true", f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    (entry,) = json.loads((out / "predictions.json").read_text())["images"]
    labels = cv2.imread(str(out / entry["labels_png"]), cv2.IMREAD_UNCHANGED)
    overlay = cv2.imread(str(out / entry["picture"]))
    assert labels.shape == (300, 451) and overlay.shape == (300, 451, 3)
    values, counts = np.unique(labels, return_counts=True)
    assert values.max() < 4
    fractions = {f"class {v}": c / labels.size for v, c in zip(values, counts)}
    assert entry["class_fractions"] == pytest.approx(fractions)


def test_missing_input_and_unreadable_photo_are_one_line_errors(photo_dir: Path, tmp_path: Path) -> None:
    done = run_tool(f"input={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'a'}")
    assert done.returncode != 0 and f"error: input {tmp_path / 'nowhere'} does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_tool(f"input={photo_dir / 'corrupt.jpg'}", *TINY_ARGS, "predict.allow_random_weights=true",
                    f"hydra.run.dir={tmp_path / 'b'}")
    assert done.returncode != 0 and "cannot decode image file" in done.stderr and "corrupt.jpg" in done.stderr
    assert "Traceback" not in done.stderr
