"""Video tracking (densekit.inference.tracking): coloured shapes moving through a video written by OpenCV keep their
track ids (ID switches counted against the painted truth), gaps shorter than ``track_buffer_s`` are bridged at any
frame rate, classes never share a track, and predictions.json / the annotated video / the summary carry the ids."""
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
from blobs import BlobDetector
from omegaconf import DictConfig, OmegaConf

import densekit
from densekit.cli.predict import Report, predict_video, summary, track_settings
from densekit.data.media import VideoFrames
from densekit.deploy.predictions import Detections
from densekit.inference.tracking import TrackingError, TrackSettings, VideoTracker, check_trackable
from densekit.utils.visualize import _color, draw_trails

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["red", "green", "blue"]  # BlobDetector's labels: the brightest channel
SIZE = (160, 120)  # video width, height: the model input (128) is smaller, so boxes are scaled back
#: label, top-left corner at frame 0, velocity (pixels / frame); 20-pixel squares that never touch.
EASY = [(0, (8, 8), (4.0, 0.5)), (1, (130, 50), (-3.0, 0.25)), (2, (10, 90), (3.0, 0.25))]
SIDE = 20


def truth(frame: int, objects: list = EASY) -> list[tuple[int, np.ndarray]]:
    """Each object's label and box (xyxy, pixel edges) at ``frame``."""
    out = []
    for label, (x, y), (vx, vy) in objects:
        x0, y0 = int(round(x + vx * frame)), int(round(y + vy * frame))
        out.append((label, np.array([x0, y0, x0 + SIDE, y0 + SIDE], dtype=np.float32)))
    return out


def write_video(path: Path, frames: int, fps: float = 10.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, SIZE)
    for f in range(frames):
        image = np.zeros((SIZE[1], SIZE[0], 3), dtype=np.uint8)
        for label, (x1, y1, x2, y2) in truth(f):
            image[int(y1):int(y2), int(x1):int(x2), label] = 230
        writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union)


def matched_ids(frames: list[Detections], objects: list = EASY) -> list[list[int | None]]:
    """Per object, per frame: the track id of the detection that covers it (IoU >= 0.5, same class), or ``None``
    (not found, or in no confirmed track)."""
    per_object: list[list[int | None]] = [[] for _ in objects]
    for f, det in enumerate(frames):
        for k, (label, box) in enumerate(truth(f, objects)):
            overlaps = [iou(box, b) if lab == label else 0.0 for b, lab in zip(det.boxes, det.labels)]
            best = int(np.argmax(overlaps)) if overlaps else -1
            ok = best >= 0 and overlaps[best] >= 0.5 and det.track_ids[best] >= 0
            per_object[k].append(int(det.track_ids[best]) if ok else None)
    return per_object


def id_switches(ids: list[int | None]) -> int:
    """Times the matched id changes between the frames where the object is matched."""
    seen = [i for i in ids if i is not None]
    return sum(a != b for a, b in zip(seen, seen[1:]))


@pytest.fixture(scope="module")
def predictor() -> densekit.Predictor:
    """A Predictor around a detector that finds the painted squares (a 3-class model config: it is a detector)."""
    detector = BlobDetector(min_side=4)
    detector.config = densekit.create_model("efficientdet_d0", num_classes=3, class_names=NAMES,
                                            neck={"repeats": 1, "channels": 16}, head={"repeats": 1}).config
    return densekit.Predictor(detector, image_size=128, optimize=False, batch_size=4, score_threshold=0.3)


def test_shapes_in_a_video_keep_their_ids_with_zero_switches(predictor, tmp_path: Path) -> None:
    video = VideoFrames(write_video(tmp_path / "shapes.mp4", 24))
    frames = list(predictor.track(video, fps=video.fps))
    assert len(frames) == 24
    per_object = matched_ids(frames)
    switches = [id_switches(ids) for ids in per_object]
    assert switches == [0, 0, 0]
    for ids in per_object:  # ByteTrack confirms a track on its 2nd frame; from then on every frame has the id
        assert ids[0] is None and None not in ids[1:]
    assert len({ids[-1] for ids in per_object}) == 3  # three objects, three ids
    for f, det in enumerate(frames[1:], start=1):  # boxes in the video's own pixels (the model saw 128 x 96)
        for label, box in truth(f):
            assert min(np.abs(det.boxes[det.labels == label] - box).max(axis=1)) <= 2.5


def test_a_switched_id_is_counted() -> None:
    assert id_switches([None, 1, 1, None, 1, 2, 2, 1]) == 2
    assert id_switches([None, None]) == 0


def frame(boxes: list[list[float]], labels: list[int], scores: float = 0.9) -> Detections:
    return Detections(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.full(len(labels), scores, np.float32),
                      np.asarray(labels, dtype=np.int64), NAMES, 120, 160)


def run(tracker: VideoTracker, frames: list[Detections]) -> list[Detections]:
    return [tracker.update(det) for det in frames]


def moving(f: int) -> list[float]:
    return [10.0 + 3 * f, 20.0, 40.0 + 3 * f, 50.0]


@pytest.mark.parametrize("name", ["bytetrack", "sort"])
def test_a_one_frame_detection_gap_keeps_the_id(name: str) -> None:
    frames = [frame([moving(f)], [0]) if f != 6 else frame([], []) for f in range(12)]
    out = run(VideoTracker(TrackSettings(name), fps=30.0), frames)
    ids = [int(det.track_ids[0]) for det in out if len(det)]
    confirmed = ids[TrackSettings(name).library_kwargs(30.0)["minimum_consecutive_frames"] - 1:]
    assert confirmed == [1] * len(confirmed) and len(confirmed) >= 8
    assert len(out[6]) == 0 and out[6].track_ids.shape == (0,)


def test_classes_never_share_a_track_and_a_track_never_changes_class() -> None:
    # Two classes on the same box in every frame: one class-blind tracker would give one of them no track.
    tracker = VideoTracker(TrackSettings("bytetrack"), fps=30.0)
    out = run(tracker, [frame([moving(f), moving(f)], [0, 1]) for f in range(6)])
    assert [list(det.track_ids) for det in out[1:]] == [[1, 2]] * 5
    # The same object detected as another class from frame 6 on: a new track, the old id is never reused for it.
    out = run(tracker, [frame([moving(f)], [2]) for f in range(6, 12)])
    assert set(int(i) for det in out[1:] for i in det.track_ids) == {3}
    assert tracker.tracks_per_class(NAMES) == {"red": 1, "green": 1, "blue": 1}


@pytest.mark.parametrize("fps", [10.0, 30.0])
def test_the_lost_track_buffer_is_seconds_at_any_frame_rate(fps: float) -> None:
    settings = TrackSettings("bytetrack", buffer_s=0.5)
    longest = settings.buffer_frames(fps)
    assert longest == round(0.5 * fps)  # 5 frames at 10 fps, 15 at 30: the same half second
    for gap, kept in ((longest, True), (longest + 1, False)):
        tracker = VideoTracker(settings, fps)
        box = [[30.0, 30.0, 60.0, 60.0]]
        frames = [frame(box, [0])] * 4 + [frame([], [])] * gap + [frame(box, [0])] * 3
        out = run(tracker, frames)
        before, after = [int(det.track_ids[0]) for det in out[1:4]], [int(det.track_ids[0]) for det in out[-3:]]
        assert before == [1, 1, 1]
        assert after == ([1, 1, 1] if kept else [-1, 2, 2]), f"a gap of {gap} frames at {fps} fps"  # -1: unconfirmed


def test_the_library_missing_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "trackers", None)  # import trackers -> ImportError
    with pytest.raises(TrackingError, match=r'predict.track=bytetrack needs the trackers package: pip install "densekit\[track\]"'):
        VideoTracker(TrackSettings("bytetrack"), fps=30.0)


def test_settings_are_checked_with_their_keys() -> None:
    assert TrackSettings.from_config(OmegaConf.create({"track": None})) is None
    cfg = OmegaConf.create({"track": "sort", "track_buffer_s": 2.0, "track_iou": None, "track_min_frames": 4})
    assert TrackSettings.from_config(cfg) == TrackSettings("sort", buffer_s=2.0, min_frames=4)
    for bad, key in (({"name": "deepsort"}, "predict.track=deepsort"), ({"buffer_s": -1.0}, "predict.track_buffer_s"),
                     ({"iou": 1.5}, "predict.track_iou"), ({"name": "sort", "high_score": 0.5}, "predict.track_high_score"),
                     ({"min_frames": 0}, "predict.track_min_frames")):
        with pytest.raises(TrackingError, match=key):
            TrackSettings(**bad)
    with pytest.raises(TrackingError, match="predict.track=sort .* segmentation model"):
        check_trackable("segmentation", "sort")
    with pytest.raises(TrackingError, match="predict.track=bytetrack .* input= must be a video"):
        track_settings(OmegaConf.create({"track": "bytetrack"}), "photos/", video=False)


def test_json_and_drawing_show_the_ids() -> None:
    det = frame([[10, 10, 60, 50], [80, 60, 150, 110]], [0, 2])
    assert "track_id" not in det.to_json()["detections"][0]  # not tracking: the JSON as before
    det.track_ids = np.array([7, -1])
    assert [d["track_id"] for d in det.to_json()["detections"]] == [7, None]
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    plain = frame([[10, 10, 60, 50], [80, 60, 150, 110]], [0, 2]).draw(image)
    drawn = det.draw(image)
    assert not np.array_equal(drawn[:10, :], plain[:10, :])  # "#7 red 0.90" is a longer caption above box 0
    assert np.array_equal(drawn[50:, 70:], plain[50:, 70:])  # box 1, unconfirmed: the caption without an id
    canvas = draw_trails(np.zeros((120, 160, 3), dtype=np.uint8), {7: np.array([[20.0, 100.0], [120.0, 100.0]])})
    assert tuple(canvas[100, 70]) == _color(7) and canvas[50].max() == 0


def predict_config(**overrides: object) -> DictConfig:
    p = OmegaConf.load(ROOT / "densekit" / "conf" / "predict.yaml").predict
    return OmegaConf.merge(p, overrides)


def test_predict_video_writes_ids_trails_and_tracks_per_class(predictor, tmp_path: Path) -> None:
    clip = write_video(tmp_path / "clip.mp4", 12)
    report = Report()
    video = predict_video(predictor, VideoFrames(clip), "clip", tmp_path, predict_config(track="bytetrack", batch_size=3),
                          report)
    assert video["frames"] == 12 and (tmp_path / "clip_pred.mp4").is_file()
    assert [d["track_id"] for d in report.entries[0]["detections"]] == [None, None, None]
    last = {d["class_name"]: d["track_id"] for d in report.entries[-1]["detections"]}
    assert sorted(last.values()) == [1, 2, 3]
    assert report.tracks["total"] == 3 and report.tracks["per_class"] == {"red": 1, "green": 1, "blue": 1}
    assert report.tracks["buffer_frames"] == 10  # 1 s at 10 fps
    json.dumps(report.tracks)  # predictions.json records it as it is
    text = summary(predictor, report, "frames", 1.0, 0.1, tmp_path)
    assert "  tracks      3: red 1, green 1, blue 1" in text.splitlines()


def test_tools_predict_tracks_a_video_into_predictions_json(randomise, tmp_path: Path) -> None:
    """The whole tool: a random-weights detector boxes a still scene the same way every frame, SORT tracks them."""
    model = densekit.create_model("efficientdet_d0", num_classes=3, neck={"repeats": 1, "channels": 16}, head={"repeats": 1})
    randomise(model, seed=3)  # confident random boxes (a fresh head scores everything ~0.01)
    torch.save({"model": model.state_dict(), "config": {"model": {"num_classes": 3, "class_names": NAMES}}},
               tmp_path / "last.pth")
    clip = tmp_path / "still.avi"  # MJPG: every frame decodes alike, so every frame gets the same boxes
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (128, 96))
    still = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    for _ in range(4):
        writer.write(still)
    writer.release()
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tools" / "predict.py"), f"input={clip}", f"weights={tmp_path / 'last.pth'}",
           "model=efficientdet_d0", "model.neck.repeats=1", "model.neck.channels=16", "model.head.repeats=1",
           "predict.image_size=128", "predict.optimize=false", "predict.track=sort", "predict.track_min_frames=2",
           f"hydra.run.dir={out}"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "predictions.json").read_text())
    assert record["predict"]["track"] == "sort" and record["tracks"]["tracker"] == "sort"
    assert record["tracks"]["min_frames"] == 2 and record["tracks"]["iou"] == 0.3  # the default filled in
    frames = record["frames"]
    assert all(d["track_id"] is None for d in frames[0]["detections"])  # SORT with min_frames 2: none yet
    ids = [d["track_id"] for d in frames[-1]["detections"]]
    assert len(ids) > 5 and None not in ids and len(set(ids)) == len(ids)  # one id per box
    assert record["tracks"]["total"] == len(ids) and sum(record["tracks"]["per_class"].values()) == len(ids)
    assert f"tracks      {len(ids)}: " in done.stdout
