"""Detection test-time augmentation: the flip and rescale passes map boxes back to the input's pixels exactly, the
plain pass alone is the model, and densekit eval / Predictor run it (off by default)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from blobs import BlobDetector, paint

import densekit
from densekit.inference.tta import DetectionTTA, TTASettings

ROOT = Path(__file__).resolve().parents[2]
TINY = {"neck": {"repeats": 1, "channels": 16}, "head": {"repeats": 1}}


@pytest.fixture(scope="module")
def detector(randomise) -> torch.nn.Module:
    torch.manual_seed(0)
    model = densekit.create_model("efficientdet_d0", num_classes=3, **TINY).eval()
    randomise(model, seed=5)
    return model


def mirrored(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Boxes reflected about the vertical centre line of an image ``width`` wide, written out by hand."""
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=1)


def test_flip_path_on_a_mirror_symmetric_input_gives_the_plain_path_mirrored(detector) -> None:
    torch.manual_seed(1)
    half = torch.rand(2, 3, 128, 64)
    images = torch.cat([half, half.flip(-1)], dim=-1)  # left-right symmetric: its flip is itself
    assert torch.equal(images, images.flip(-1))
    plain, flipped = DetectionTTA(detector, TTASettings(scales=(1.0,), flip=True)).passes(images)
    reference = detector(images)
    for ref, p, f in zip(reference, plain, flipped):
        assert len(ref["scores"]) > 10  # random weights: many boxes at score threshold 0
        torch.testing.assert_close(p["boxes"], ref["boxes"])  # the plain pass is the model
        torch.testing.assert_close(f["boxes"], mirrored(ref["boxes"], 128), atol=1e-4, rtol=0)
        torch.testing.assert_close(f["scores"], ref["scores"])
        assert torch.equal(f["labels"], ref["labels"])


@pytest.mark.parametrize("merge", ["wbf", "nms"])
def test_one_plain_pass_equals_the_model(detector, merge: str) -> None:
    images = torch.rand(2, 3, 128, 128)
    tta = DetectionTTA(detector, TTASettings(scales=(1.0,), flip=False, merge=merge))
    for got, ref in zip(tta(images), detector(images)):
        torch.testing.assert_close(got["boxes"], ref["boxes"])
        torch.testing.assert_close(got["scores"], ref["scores"])
        assert torch.equal(got["labels"], ref["labels"])


def test_every_flip_and_scale_pass_finds_the_objects_where_they_are() -> None:
    image = torch.zeros(1, 3, 96, 160)  # not square, asymmetric: a wrong flip width or axis shows
    objects = {0: (20, 30, 52, 62), 2: (100, 10, 140, 40)}  # label (channel) -> box
    for channel, box in objects.items():
        paint(image[0], box, channel)
    tta = DetectionTTA(BlobDetector(), TTASettings(scales=(0.5, 1.0, 2.0), flip=True))
    passes = tta.passes(image)
    assert len(passes) == 6
    for per_image in passes:
        found = {int(label): box for box, label in zip(per_image[0]["boxes"], per_image[0]["labels"])}
        assert sorted(found) == sorted(objects)
        for label, box in objects.items():
            torch.testing.assert_close(found[label], torch.tensor(box, dtype=torch.float32), atol=2.5, rtol=0)
    merged = tta(image)[0]
    assert sorted(merged["labels"].tolist()) == [0, 2]  # each object once: the six passes fused
    for box, label in zip(merged["boxes"], merged["labels"]):
        torch.testing.assert_close(box, torch.tensor(objects[int(label)], dtype=torch.float32), atol=1.5, rtol=0)


def test_settings_are_checked_and_off_by_default() -> None:
    assert TTASettings.from_config({"tta": False}) is None
    assert TTASettings.from_config({"tta": True}) == TTASettings(scales=(1.0,), flip=True, merge="wbf", iou=0.55)
    with pytest.raises(ValueError, match="tta_merge='soft'"):
        TTASettings(merge="soft")
    with pytest.raises(ValueError, match="positive"):
        TTASettings(scales=(1.0, -0.5))


def test_predictor_tta_and_segmentation_refusal(detector) -> None:
    image = (torch.rand(3, 100, 150) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    plain = densekit.Predictor(detector, image_size=128, score_threshold=0.0)
    with_tta = densekit.Predictor(detector, image_size=128, score_threshold=0.0, tta=TTASettings(flip=False))
    a, b = plain(image), with_tta(image)
    assert a.boxes.shape == b.boxes.shape and abs(a.boxes - b.boxes).max() < 1e-3  # one plain pass: the same boxes
    flipped = densekit.Predictor(detector, image_size=128, score_threshold=0.0, tta=True)(image)
    assert (flipped.boxes[:, 2] <= 150).all() and (flipped.boxes[:, 3] <= 100).all()  # original pixels, clipped
    seg = densekit.create_model("lraspp_mobilenet_v3_small", num_classes=3)
    with pytest.raises(ValueError, match="data.eval_flip=true"):
        densekit.Predictor(seg, tta=True)


def test_densekit_eval_with_tta_and_slicing_records_them(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DENSEKIT_DATASETS": str(tmp_path / "data"), "OMP_NUM_THREADS": "2"}
    args = ["model=efficientdet_d0", "model.neck.repeats=1", "model.neck.channels=16", "model.head.repeats=1",
            "data.num_train=2", "data.num_val=2", "data.image_size=128", "eval.plots=false", "eval.num_workers=0",
            "eval.allow_random_weights=true", "eval.tta=true", "eval.tta_scales=[1.0,1.5]", "eval.slice=[128,128]"]
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), *args, f"hydra.run.dir={tmp_path / 'e'}"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["inference"] == ("sliced: 128x128 tiles, overlap 0.2 + the full image, merged by greedy at 0.5; "
                                    "TTA: scales [1, 1.5] + flips, 4 passes merged by wbf")
    assert 0.0 <= metrics["AP"] <= 1.0
    detections = json.loads((tmp_path / "e" / "detections_val.json").read_text())
    assert detections and all(d["bbox"][0] >= 0 and d["bbox"][2] > 0 for d in detections)
