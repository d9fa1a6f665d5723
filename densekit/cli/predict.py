"""Run a model on your own images or video: ``densekit predict input=photos/ weights=run/checkpoints/last.pth``
(``python tools/predict.py`` in a checkout).

``input=`` is an image, a folder (searched recursively), a glob (``'photos/**/*.jpg'``), a video file or a webcam
index (``input=0``; ``predict.max_frames`` caps it, Ctrl-C stops it). The run directory gets ``predictions.json``
(per image or frame: file or frame index, original height / width, and the detections with ``bbox`` xyxy in
original-image pixels, score, label and class name, or for segmentation the per-class pixel fractions and the
label PNG), ``pictures/`` (boxes with class names and scores, or colour overlays), ``labels/`` (segmentation: the
class index of every pixel, at the original size) and, for a video, ``<name>_pred.mp4``. A file in a folder that
does not decode is skipped, logged and listed in the summary; a single unreadable input is an error.

``predict.track=bytetrack`` (or ``sort``) on a video or webcam follows the detected objects across frames
(densekit.inference.tracking): each detection gets a ``track_id`` (``null`` while its track is unconfirmed), the
video shows "#id" captions and trails, and predictions.json and the summary count the tracks per class.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from densekit.config import register_configs
from densekit.cli.errors import reports_user_errors, run_tool
from densekit.data.decode import read_image
from densekit.data.media import ImageFile, VideoFrames, atomic_video_writer, is_video, is_webcam, list_images, video_suffix
from densekit.deploy.predictions import Prediction
from densekit.deploy.predictor import Predictor
from densekit.inference.tracking import TrackSettings, TrackingError, VideoTracker, check_trackable, tracker_class
from densekit.inference.wrappers import settings_of
from densekit.utils.files import atomic_save_json
from densekit.utils.visualize import save_image

log = logging.getLogger("densekit.predict")

T = TypeVar("T")


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter), without reading ahead further."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class Report:
    """What the run produced: one JSON entry per image or frame, the skipped files, and per-class totals."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    tally: Counter = field(default_factory=Counter)
    unit: str = "detections"
    #: Video tracking (``predict.track``): the tracker's settings, the track count and tracks per class.
    tracks: dict[str, Any] | None = None

    def add(self, result: Prediction, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        self.tally.update(result.tally())
        self.unit = result.tally_unit


def save_outputs(result: Prediction, image: np.ndarray, key: str, out_dir: Path, p: DictConfig) -> dict[str, Any]:
    """Write one image's picture (and label PNG) and return its JSON entry (paths relative to ``out_dir``)."""
    entry: dict[str, Any] = {"height": result.height, "width": result.width}
    if p.save_images:
        entry["picture"] = f"pictures/{key}.jpg"
        save_image(out_dir / entry["picture"], result.draw(image))
    if p.save_labels:
        for kind, array in result.extra_images().items():
            entry[f"{kind}_png"] = f"{kind}/{key}.png"
            save_image(out_dir / entry[f"{kind}_png"], array)
    return {**entry, **result.to_json()}


def predict_images(predictor: Predictor, items: list[ImageFile], single: bool, out_dir: Path, p: DictConfig, report: Report) -> None:
    """``items``, ``batch_size`` at a time; undecodable files of a folder / glob are skipped, a ``single`` one raises."""
    with tqdm(total=len(items), desc="predict", unit="img", dynamic_ncols=True) as bar:
        for chunk in chunks(items, p.batch_size):
            loaded = []
            for item in chunk:
                try:
                    loaded.append((item, read_image(item.path)))
                except OSError as err:
                    if single:
                        raise
                    log.warning("skipping %s: %s", item.path, err)
                    report.skipped.append({"file": str(item.path), "error": str(err)})
            results = predictor.predict([image for _, image in loaded], names=[str(item.path) for item, _ in loaded])
            for (item, image), result in zip(loaded, results):
                report.add(result, {"file": str(item.path), **save_outputs(result, image, item.key, out_dir, p)})
            bar.update(len(chunk))


def predict_video(predictor: Predictor, frames: VideoFrames, stem: str, out_dir: Path, p: DictConfig, report: Report) -> dict[str, Any]:
    """Every frame of a video file or camera (up to ``max_frames``; Ctrl-C ends a camera run cleanly), drawn into an
    annotated video ``<stem>_pred.mp4`` with the source's frame rate and size.

    With ``predict.track`` the frames' detections, in order, go through a tracker (densekit.inference.tracking):
    track ids in the JSON entries, ids and trails in the video, and ``report.tracks``."""
    settings = TrackSettings.from_config(p)
    tracker = VideoTracker(settings, frames.fps) if settings is not None else None
    video_path = out_dir / f"{stem}_pred{video_suffix(p.video_codec)}"
    writer = atomic_video_writer(video_path, frames.fps, frames.size, p.video_codec) if p.save_video else contextlib.nullcontext()
    try:
        with writer as video, tqdm(total=frames.total, desc="predict", unit="frame", dynamic_ncols=True) as bar:
            try:
                for chunk in chunks(frames, p.batch_size):
                    first = len(report.entries)
                    names = [f"{frames.name} frame {first + i}" for i in range(len(chunk))]
                    for i, (frame, result) in enumerate(zip(chunk, predictor.predict(chunk, names=names))):
                        if tracker is not None:
                            result = tracker.update(result)
                        report.add(result, {"frame": first + i, "height": result.height, "width": result.width, **result.to_json()})
                        if video is not None:
                            video.write(tracker.draw(result, frame) if tracker is not None else result.draw(frame))
                    bar.update(len(chunk))
            except KeyboardInterrupt:
                log.warning("stopped by Ctrl-C after %d frames", len(report.entries))
    finally:
        frames.close()
        if tracker is not None:  # what was tracked, also when Ctrl-C ended the run
            report.tracks = tracker.summary(predictor.class_names)
    return {"source": frames.name, "fps": frames.fps, "width": frames.size[0], "height": frames.size[1],
            "frames": len(report.entries), "declared_frames": frames.declared_frames, "truncated": frames.truncated,
            "output": video_path.name if p.save_video else None}


def summary(predictor: Predictor, report: Report, kind: str, seconds: float, load_seconds: float, out_dir: Path) -> str:
    """The one screen printed at the end."""
    n = len(report.entries)
    total = sum(report.tally.values())
    top = ", ".join(f"{name} {count:g} ({count / total:.0%})" for name, count in report.tally.most_common(8)) if total else "none"
    lines = [
        f"{predictor!r}",
        f"  {kind:<12}{n}" + (f" ({len(report.skipped)} skipped)" if report.skipped else ""),
        f"  {report.unit:<12}{total:,.0f}: {top}",
        f"  {'time':<12}{seconds:.1f} s, {n / max(seconds, 1e-9):.2f} {kind}/s (model loaded in {load_seconds:.1f} s)",
    ]
    if report.tracks is not None:
        per_class = ", ".join(f"{name} {count}" for name, count in list(report.tracks["per_class"].items())[:8]) or "none"
        if len(report.tracks["per_class"]) > 8:
            per_class += f", ... ({len(report.tracks['per_class'])} classes)"
        lines.insert(3, f"  {'tracks':<12}{report.tracks['total']}: {per_class}")
    lines += [f"  skipped     {s['file']}: {s['error']}" for s in report.skipped[:10]]
    if len(report.skipped) > 10:
        lines.append(f"  ... and {len(report.skipped) - 10} more (predictions.json lists them all)")
    written = sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir() if not p.name.startswith("."))
    lines.append(f"  {'output':<12}{out_dir}: {', '.join(written)}")
    return "\n".join(lines)


def input_of(cfg: DictConfig) -> Any:
    """``input=``, or else the image folder of a data config's split (``data=custom data.val_images=...``), as
    tools/train.py and tools/eval.py read it."""
    if cfg.get("input") is not None:
        return cfg.input
    data = cfg.get("data")
    if data is not None and data.get(f"{data.split}_images"):
        return data[f"{data.split}_images"]
    raise ValueError("tools/predict.py needs input=<an image, folder, glob, video file or webcam index>, "
                     "or a data config naming the images (e.g. data=custom data.val_images=/data/images)")


def track_settings(p: DictConfig, source_path: Any, video: bool) -> TrackSettings | None:
    """``predict.track``'s settings, checked before the model is built (an image input, a bad value or a missing
    package costs no model loading); ``None`` when not tracking."""
    track = TrackSettings.from_config(p)
    if track is None:
        return None
    if not video:  # an error, not a warning: the user asked for tracks and would get a run without any
        raise TrackingError(f"predict.track={track.name} follows objects across the frames of a video: input= must be "
                            f"a video file or a webcam index, got {source_path}; leave predict.track null for images")
    tracker_class(track.name)
    return track


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Predict on the input (:func:`input_of`) and write the run directory's files; returns what
    ``predictions.json`` holds."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    p = cfg.predict
    source_path = input_of(cfg)
    video = is_webcam(source_path) or is_video(source_path)
    # The input is checked before the model is built: a typo costs no model loading.
    source = VideoFrames(source_path, p.max_frames) if video else list_images(str(source_path))
    track = track_settings(p, source_path, video)
    if not cfg.weights and not p.allow_random_weights:
        raise ValueError("tools/predict.py needs weights=<checkpoint> (or predict.allow_random_weights=true)")
    start = time.perf_counter()
    tta, slicing = settings_of(p)
    predictor = Predictor(cfg.model, weights=cfg.weights, device=cfg.device, score_threshold=p.score_threshold,
                          image_size=p.image_size, optimize=p.optimize, compile=p.compile, batch_size=p.batch_size,
                          prefer_ema=p.ema, backend=p.backend, tta=tta or False, slicing=slicing)
    if track is not None:
        check_trackable(predictor.task.name, track.name)
    load_seconds = time.perf_counter() - start
    report = Report()
    record: dict[str, Any] = {"model": predictor.config.name, "weights": cfg.weights, "input": source_path,
                              "task": predictor.task.name, "class_names": predictor.class_names,
                              "predict": OmegaConf.to_container(p, resolve=True)}
    start = time.perf_counter()
    if isinstance(source, VideoFrames):
        kind = "frames"
        stem = f"webcam{int(source_path)}" if is_webcam(source_path) else Path(str(source_path)).stem
        record["video"] = predict_video(predictor, source, stem, out_dir, p, report)
    else:
        kind = "images"
        predict_images(predictor, source, Path(str(source_path)).is_file(), out_dir, p, report)
    seconds = time.perf_counter() - start
    record.update({kind: report.entries, "skipped": report.skipped, "seconds": seconds})
    if report.tracks is not None:
        record["tracks"] = report.tracks
    atomic_save_json(record, out_dir / "predictions.json")
    print(summary(predictor, report, kind, seconds, load_seconds, out_dir))
    return record


register_configs()


@hydra.main(config_path="../conf", config_name="predict", version_base=None)
@reports_user_errors()
def hydra_main(cfg: DictConfig) -> None:
    predict(cfg)


def main() -> None:
    """Entry point: a user's mistake is one ``error:`` block, exit code 2 (densekit.cli.errors)."""
    run_tool(hydra_main)


if __name__ == "__main__":
    main()
