"""A user's own pictures and videos: what an ``input=`` names (an image, a folder, a glob, a video file, a webcam),
video frames read with OpenCV, and annotated videos written atomically.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv")
log = logging.getLogger(__name__)
#: Frames per second written when a camera does not report its own.
DEFAULT_FPS = 30.0


@dataclass(frozen=True)
class ImageFile:
    """One image of an input, and the name its outputs take.

    Attributes:
        path: The file.
        key: Its path relative to the input's root, without the suffix (``"trip/beach"``), unique within the input:
            the outputs keep the folder structure (``pictures/trip/beach.jpg``). Two files differing only in their
            suffix keep it in the key (``beach_png``).
    """

    path: Path
    key: str


def is_webcam(source: str | int) -> bool:
    """Whether an ``input=`` value names a camera index (``0``, or ``"0"`` when no such file exists)."""
    if isinstance(source, int):
        return True
    return str(source).isdigit() and not Path(str(source)).exists()


def is_video(source: str | int) -> bool:
    """Whether an ``input=`` value names a video file (by its suffix)."""
    return not is_webcam(source) and Path(str(source)).suffix.lower() in VIDEO_SUFFIXES


def video_suffix(codec: str) -> str:
    """The container OpenCV writes ``codec`` in: ``.mp4`` for MPEG-4 / H.264 / HEVC codes, else ``.avi``."""
    return ".mp4" if codec.lower() in {"mp4v", "avc1", "h264", "hev1", "hvc1"} else ".avi"


def _has_magic(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def list_images(spec: str | os.PathLike) -> list[ImageFile]:
    """The images an ``input=`` names: a file, every image under a folder (recursively, sorted), or a glob's matches
    (``**`` recurses). Images are recognised by suffix (:data:`IMAGE_SUFFIXES`); a single file is taken as given.

    Raises:
        FileNotFoundError: nothing exists at ``spec`` or no image is there, with what ``input=`` accepts.
    """
    text = os.fspath(spec)
    path = Path(text)
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        root = path
    elif _has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        files = [p for p in files if p.is_file()]
        root = Path(os.path.commonpath([p.parent for p in files])) if files else path.parent
    else:
        raise FileNotFoundError(
            f"input {text} does not exist: give an image, a folder of images, a glob such as 'photos/*.jpg', "
            "a video file or a webcam index (input=0)"
        )
    if not files:
        raise FileNotFoundError(f"no images ({' '.join(IMAGE_SUFFIXES)}) found in {text}")
    return _with_keys(files, root)


def _with_keys(files: list[Path], root: Path) -> list[ImageFile]:
    stems = [p.relative_to(root).with_suffix("").as_posix() for p in files]
    taken = {s: stems.count(s) for s in stems}
    keys = [s if taken[s] == 1 else f"{s}_{p.suffix.lstrip('.').lower()}" for s, p in zip(stems, files)]
    return [ImageFile(p, k) for p, k in zip(files, keys)]


class VideoFrames:
    """The frames of a video file or a camera, RGB, read with OpenCV.

    Args:
        source: A video file, or a camera index.
        max_frames: Stop after this many frames (``None``: the whole file; a camera until the caller stops).

    Attributes:
        declared_frames: The frame count the file's container declares; ``None`` for a camera or a container that
            declares none.
        frames_read: Frames yielded so far.
        truncated: Whether the stream ended before ``declared_frames`` (a file cut short or damaged; logged as a
            warning when iteration ends). Never set when ``max_frames`` stopped the reading.

    Raises:
        FileNotFoundError: the video file does not exist.
        OSError: OpenCV cannot open it (or the camera), with the name.
    """

    def __init__(self, source: str | os.PathLike | int, max_frames: int | None = None) -> None:
        camera = is_webcam(source)
        self.name = f"webcam {int(source)}" if camera else os.fspath(source)
        if not camera and not Path(self.name).is_file():
            raise FileNotFoundError(f"video file {self.name} does not exist")
        self._capture = cv2.VideoCapture(int(source) if camera else self.name)
        if not self._capture.isOpened():
            raise OSError(f"OpenCV cannot open {self.name}" + (" (is a camera connected?)" if camera else
                          " (not a video, or a codec this OpenCV build lacks)"))
        fps = self._capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and np.isfinite(fps) and fps > 0 else DEFAULT_FPS
        self.size = (int(self._capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self._capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        count = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT)) if not camera else 0
        self.declared_frames: int | None = count if count > 0 else None
        self.frames_read = 0
        self.truncated = False
        self.max_frames = max_frames
        #: Frames expected (for a progress bar), ``None`` when unknown.
        known = [n for n in (self.declared_frames, max_frames) if n is not None]
        self.total = min(known) if known else None

    def __iter__(self) -> Iterator[np.ndarray]:
        self.frames_read = 0
        while self.max_frames is None or self.frames_read < self.max_frames:
            ok, frame = self._capture.read()
            if not ok:
                self._check_complete()
                break
            self.frames_read += 1
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        if self.frames_read == 0:
            raise OSError(f"no frame could be read from {self.name}")

    def _check_complete(self) -> None:
        # OpenCV ends a cut-short or damaged file as it ends a whole one (read() returns False); only the count the
        # container declared tells them apart, and without this a user takes predictions on part of a video for all.
        if self.declared_frames is not None and 0 < self.frames_read < self.declared_frames:
            self.truncated = True
            log.warning("video %s ended after %d of %d frames (the file is truncated or damaged); predictions cover "
                        "the first %d", self.name, self.frames_read, self.declared_frames, self.frames_read)

    def close(self) -> None:
        self._capture.release()


@contextlib.contextmanager
def atomic_video_writer(
    path: str | os.PathLike, fps: float, frame_size: tuple[int, int], codec: str = "mp4v"
) -> Iterator[cv2.VideoWriter]:
    """A ``cv2.VideoWriter`` whose video appears at ``path`` only once complete (as
    :func:`densekit.checkpoint.io.atomic_write` for other files): frames go to a uniquely named temporary file in
    the same folder (with ``path``'s suffix, from which OpenCV picks the container), renamed over ``path`` when the
    block ends; if the block raises, the temporary file is removed.

    Args:
        path: The destination (``.mp4`` for ``mp4v``, ``.avi`` for ``MJPG``...).
        fps: Frames per second.
        frame_size: ``(width, height)`` of every frame written (BGR ``uint8``).
        codec: FourCC code.

    Raises:
        OSError: OpenCV cannot write this codec / container.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*codec), fps, tuple(frame_size))
    if not writer.isOpened():
        tmp.unlink(missing_ok=True)
        raise OSError(f"OpenCV cannot write {codec!r} video to {path} (try predict.video_codec=MJPG, written as .avi)")
    try:
        yield writer
        writer.release()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the frames reach the disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException:
        writer.release()
        tmp.unlink(missing_ok=True)
        raise
