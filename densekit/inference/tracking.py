"""Multi-object tracking over video frames: ``densekit predict input=video.mp4 predict.track=bytetrack`` and
:meth:`densekit.Predictor.track`.

The trackers themselves are Roboflow's ``trackers`` package (ByteTrack, SORT; ``pip install "densekit[track]"``),
imported only when a tracker is built. This module adapts densekit's
:class:`~densekit.deploy.predictions.Detections` to it and back, and adds what the library leaves to its user:

- **Class-aware tracks.** The library associates boxes by IoU alone, whatever their class, so a car box could
  continue a person's track. Each class gets its own library tracker here: a track never changes class.
- **Ids of our own**: 1, 2, 3... per video, in the order tracks are confirmed, unique across classes. The library
  numbers tracks from a counter shared by every tracker in the process (a class attribute), so its ids would depend
  on whatever ran earlier in the same process.
- **Seconds, not frames.** How long a lost track is kept (``buffer_s``) is converted with the video's frame rate, so
  the same setting bridges a gap of the same duration at 10 or 60 fps (:meth:`TrackSettings.buffer_frames`).
- **Unconfirmed detections stay.** A detection whose track is not confirmed yet (``min_frames``), or that starts
  none (score below ``activation``), keeps its place with ``track_id`` -1 (``null`` in predictions.json): the
  tracker adds ids, it does not hide what the detector found.
- Trails of recent box centres for drawing, and tracks per class for the summary.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..deploy.predictions import Detections
from ..utils.visualize import draw_trails

if TYPE_CHECKING:
    from ..deploy.predictor import ImageInput, Predictor

__all__ = ["TRACKERS", "TrackSettings", "TrackerSpec", "TrackingError", "VideoTracker", "check_trackable", "track_frames",
           "tracker_class"]

#: The id of a detection that belongs to no confirmed track.
UNTRACKED = -1


class TrackingError(ValueError):
    """A tracking setting that cannot work, or the tracking package missing (a user's fix, worded as one)."""


@dataclass(frozen=True)
class TrackerSpec:
    """A tracker of the ``trackers`` package and its defaults (the library's own).

    Attributes:
        class_name: The class in the ``trackers`` package.
        activation: Score a detection needs to start a track.
        iou: Minimum IoU between a track's predicted box and a detection to match them.
        min_frames: Frames a track must be matched in before it gets an id.
        high_score: ByteTrack only: detections scoring at least this are matched first, the others only to tracks
            left over (its way of keeping occluded, low-scoring objects); ``None`` for a tracker without it.
    """

    class_name: str
    activation: float
    iou: float
    min_frames: int
    high_score: float | None = None


#: ``predict.track`` values.
TRACKERS: dict[str, TrackerSpec] = {
    "bytetrack": TrackerSpec("ByteTrackTracker", activation=0.7, iou=0.1, min_frames=2, high_score=0.6),
    "sort": TrackerSpec("SORTTracker", activation=0.25, iou=0.3, min_frames=3),
}


def _check_fraction(key: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise TrackingError(f"predict.{key} must lie in [0, 1], got {value}")


@dataclass(frozen=True)
class TrackSettings:
    """How detections are linked into tracks. ``None`` thresholds take the tracker's default (:data:`TRACKERS`).

    The config keys are ``predict.track`` (``name``) and ``predict.track_<field>`` for the others; errors name them.

    Attributes:
        name: ``bytetrack`` or ``sort``.
        buffer_s: Seconds a lost track is kept: an object missed for up to this long keeps its id when found again
            (0: one missed frame ends the track).
        activation: Score a detection needs to start a track.
        high_score: ByteTrack's first-pass score (see :class:`TrackerSpec`).
        iou: Minimum IoU to match a detection to a track.
        min_frames: Frames a track must be matched in before it gets an id (a count of frames, not seconds: it is
            evidence that the object is real, which a higher frame rate does not give sooner).
        trail_s: Seconds of box centres drawn behind each tracked object (0: no trails).
    """

    name: str = "bytetrack"
    buffer_s: float = 1.0
    activation: float | None = None
    high_score: float | None = None
    iou: float | None = None
    min_frames: int | None = None
    trail_s: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in TRACKERS:
            raise TrackingError(f"predict.track={self.name} is not a tracker; choose one of {', '.join(TRACKERS)}")
        for key, seconds in (("track_buffer_s", self.buffer_s), ("track_trail_s", self.trail_s)):
            if not seconds >= 0:
                raise TrackingError(f"predict.{key} is in seconds and must be at least 0, got {seconds}")
        for key in ("activation", "high_score", "iou"):
            _check_fraction(f"track_{key}", getattr(self, key))
        if self.min_frames is not None and self.min_frames < 1:
            raise TrackingError(f"predict.track_min_frames must be at least 1, got {self.min_frames}")
        if self.high_score is not None and TRACKERS[self.name].high_score is None:
            raise TrackingError(f"predict.track_high_score is ByteTrack's; predict.track={self.name} has no such "
                                "setting: leave it null")

    @classmethod
    def from_config(cls, section: Any) -> TrackSettings | None:
        """The settings of a ``predict`` config section (``track``, ``track_buffer_s``, ...); ``None`` when
        ``track`` is null."""
        if section.get("track") is None:
            return None
        fields = {f.name: section.get(f"track_{f.name}") for f in dataclasses.fields(cls) if f.name != "name"}
        return cls(name=str(section.track), **{k: v for k, v in fields.items() if v is not None})

    def buffer_frames(self, fps: float) -> int:
        """The longest gap, in frames at ``fps``, that a track survives: ``buffer_s`` rounded to whole frames."""
        return int(round(self.buffer_s * fps))

    def trail_frames(self, fps: float) -> int:
        """Box centres kept per track for its trail."""
        return int(round(self.trail_s * fps))

    def resolved(self, fps: float) -> dict[str, Any]:
        """The settings in effect at ``fps``, defaults filled in, under their own names (for predictions.json)."""
        kwargs = self.library_kwargs(fps)
        return {"tracker": self.name, "fps": fps, "buffer_s": self.buffer_s, "buffer_frames": self.buffer_frames(fps),
                "activation": kwargs["track_activation_threshold"], "high_score": kwargs.get("high_conf_det_threshold"),
                "iou": kwargs["minimum_iou_threshold"], "min_frames": kwargs["minimum_consecutive_frames"]}

    def library_kwargs(self, fps: float) -> dict[str, Any]:
        """The library tracker's constructor arguments for a video at ``fps``.

        The library keeps a lost track while ``frames since its last match < int(frame_rate / 30 *
        lost_track_buffer)``: ``lost_track_buffer`` counts frames of a 30 fps video. Passing ``frame_rate=30`` and
        the buffer already in this video's frames (+1: the bound is strict) gives the exact whole number of frames,
        with no float truncation (``int(10 / 30 * 30)`` is 9).
        """
        spec = TRACKERS[self.name]
        kwargs: dict[str, Any] = {
            "lost_track_buffer": self.buffer_frames(fps) + 1,
            "frame_rate": 30.0,
            "track_activation_threshold": spec.activation if self.activation is None else self.activation,
            "minimum_consecutive_frames": spec.min_frames if self.min_frames is None else self.min_frames,
            "minimum_iou_threshold": spec.iou if self.iou is None else self.iou,
        }
        if spec.high_score is not None:
            kwargs["high_conf_det_threshold"] = spec.high_score if self.high_score is None else self.high_score
        return kwargs


def check_trackable(task_name: str, tracker: str) -> None:
    """Tracking follows boxes: a model of another task (segmentation) is an error that names the key."""
    if task_name != "detection":
        raise TrackingError(f"predict.track={tracker} follows detection boxes across frames; this is a {task_name} "
                            "model: pick a detection model or leave predict.track null")


def tracker_class(name: str) -> type:
    """The ``trackers`` package's class for tracker ``name`` (:data:`TRACKERS`).

    Raises:
        TrackingError: the package is not installed.
    """
    try:
        import trackers
    except ImportError as err:
        raise TrackingError(f'predict.track={name} needs the trackers package: pip install "densekit[track]" '
                            f"({err})") from err
    return getattr(trackers, TRACKERS[name].class_name)


def library_factory(settings: TrackSettings, fps: float) -> Callable[[], Any]:
    """A function that builds a new library tracker for ``settings`` at ``fps`` (raises as :func:`tracker_class`)."""
    cls = tracker_class(settings.name)
    kwargs = settings.library_kwargs(fps)
    return lambda: cls(**kwargs)


def to_supervision(detections: Detections, rows: np.ndarray) -> Any:
    """``detections[rows]`` as the library's ``supervision.Detections``; ``data["row"]`` numbers them so that the
    tracker's answer, which reorders and drops detections (ByteTrack), maps back."""
    import supervision as sv

    return sv.Detections(
        xyxy=detections.boxes[rows].astype(np.float32).reshape(-1, 4),
        confidence=detections.scores[rows].astype(np.float32),
        class_id=detections.labels[rows].astype(np.int64),
        data={"row": np.arange(len(rows))},
    )


@dataclass
class _Track:
    """A confirmed track: its class, the library's key for it, when it was last matched and its recent centres."""

    label: int
    key: tuple[int, int]
    last_frame: int
    trail: deque[tuple[float, float]]


class VideoTracker:
    """Adds track ids to the :class:`~densekit.deploy.predictions.Detections` of consecutive frames of one video.

    Args:
        settings: The tracker and its settings.
        fps: The video's frame rate (converts the settings in seconds to frames).

    Raises:
        TrackingError: a frame rate that is not positive, or the ``trackers`` package missing.
    """

    def __init__(self, settings: TrackSettings, fps: float) -> None:
        if not fps > 0:
            raise TrackingError(f"tracking needs the video's frame rate, got fps={fps}")
        self.settings = settings
        self.fps = float(fps)
        self._new_tracker = library_factory(settings, fps)
        self._by_class: dict[int, Any] = {}  # label -> its library tracker, built on the class's first detection
        self._ids: dict[tuple[int, int], int] = {}  # (label, library id) -> our id, while the track may return
        self._tracks: dict[int, _Track] = {}
        self._trail_frames = max(1, settings.trail_frames(fps))
        # A track unmatched for longer than the library keeps one (buffer + 1 frames) is gone; forgetting it bounds
        # memory on a camera. Twice that horizon: forgetting a track the library still has would give it a new id.
        self._forget_after = 2 * (settings.buffer_frames(fps) + 1)
        self.counts: Counter[int] = Counter()  # confirmed tracks per label
        self._last_id = 0
        self.frame = -1

    def update(self, detections: Detections) -> Detections:
        """The next frame's detections -> the same detections, in the same order, with ``track_ids`` set."""
        self.frame += 1
        labels = detections.labels.astype(np.int64)
        ids = np.full(len(labels), UNTRACKED, dtype=np.int64)
        # Every class's tracker sees every frame, with no boxes while its class is absent: its lost-track clock
        # counts frames, and a tracker skipped for a frame would keep its tracks longer than buffer_s.
        for label in sorted(set(self._by_class) | set(labels.tolist())):
            rows = np.flatnonzero(labels == label)
            ids[rows] = self._update_class(label, detections, rows)
        self._follow(detections.boxes, ids)
        return dataclasses.replace(detections, track_ids=ids)

    def _update_class(self, label: int, detections: Detections, rows: np.ndarray) -> np.ndarray:
        """Our ids for ``detections[rows]`` (all of class ``label``) from that class's library tracker."""
        if label not in self._by_class:
            self._by_class[label] = self._new_tracker()
        found = self._by_class[label].update(to_supervision(detections, rows))
        ids = np.full(len(rows), UNTRACKED, dtype=np.int64)
        if len(found) == 0:  # supervision drops the data of an empty result
            return ids
        for row, library_id in zip(found.data["row"], np.asarray(found.tracker_id).astype(np.int64)):
            if library_id >= 0:  # the library's -1: not confirmed yet
                ids[int(row)] = self._our_id(label, int(library_id))
        return ids

    def _our_id(self, label: int, library_id: int) -> int:
        key = (label, library_id)
        if key not in self._ids:
            self._last_id += 1
            self._ids[key] = self._last_id
            self._tracks[self._last_id] = _Track(label, key, self.frame, deque(maxlen=self._trail_frames))
            self.counts[label] += 1
        return self._ids[key]

    def _follow(self, boxes: np.ndarray, ids: np.ndarray) -> None:
        """Extend the trails of this frame's tracks; forget tracks the library has dropped."""
        for box, track_id in zip(boxes, ids):
            if track_id != UNTRACKED:
                track = self._tracks[int(track_id)]
                track.last_frame = self.frame
                track.trail.append((float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2))
        for track_id in [i for i, t in self._tracks.items() if self.frame - t.last_frame > self._forget_after]:
            del self._ids[self._tracks.pop(track_id).key]

    def trails(self, track_ids: np.ndarray | None) -> dict[int, np.ndarray]:
        """``{track id: float [K, 2] recent box centres, oldest first}`` for the tracks in ``track_ids``."""
        if track_ids is None or self.settings.trail_s == 0:
            return {}
        return {int(i): np.asarray(self._tracks[int(i)].trail) for i in track_ids if int(i) in self._tracks}

    def draw(self, detections: Detections, image_rgb: np.ndarray) -> np.ndarray:
        """A BGR copy of ``image_rgb`` with the boxes, their "#id name score" captions and the tracks' trails."""
        return draw_trails(detections.draw(image_rgb), self.trails(detections.track_ids))

    def tracks_per_class(self, class_names: list[str]) -> dict[str, int]:
        """Confirmed tracks so far per class name, most first."""
        return {class_names[label]: count for label, count in self.counts.most_common()}

    def summary(self, class_names: list[str]) -> dict[str, Any]:
        """What predictions.json records about the tracks."""
        return {**self.settings.resolved(self.fps), "total": sum(self.counts.values()),
                "per_class": self.tracks_per_class(class_names)}


def track_frames(predictor: Predictor, frames: Iterable[ImageInput], settings: TrackSettings,
                 fps: float) -> Iterator[Detections]:
    """``predictor``'s detections on consecutive ``frames`` with track ids, ``predictor.batch_size`` frames per
    forward pass, read no further ahead than one batch (a camera works). Settings, task and package are checked
    here, at the call, not at the first frame."""
    check_trackable(predictor.task.name, settings.name)
    return _tracked(predictor, iter(frames), VideoTracker(settings, fps))


def _tracked(predictor: Predictor, frames: Iterator[ImageInput], tracker: VideoTracker) -> Iterator[Detections]:
    while batch := list(itertools.islice(frames, predictor.batch_size)):
        for result in predictor.predict(batch):
            yield tracker.update(result)
