"""A video file cut short (its container declares N frames, decoding stops at M < N) is read as far as it goes and
says so once, with both counts; a whole file, or one stopped by ``max_frames``, says nothing."""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from densekit.data.media import VideoFrames

FRAMES = 30


def _write_avi(path: Path) -> Path:
    # MJPG in AVI: the header declares the frame count, so a file cut short still reports all of them (an MP4 cut
    # short loses its moov atom and does not open at all).
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for _ in range(FRAMES):
        writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    return path


@pytest.fixture()
def truncated(tmp_path: Path) -> Path:
    path = _write_avi(tmp_path / "clip.avi")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    capture = cv2.VideoCapture(str(path))
    # The premise of the test: OpenCV still reports the declared count for the cut file.
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES
    capture.release()
    return path


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "densekit.data.media"]


def test_truncated_video_warns_once_with_both_counts(truncated: Path, caplog: pytest.LogCaptureFixture) -> None:
    frames = VideoFrames(truncated)
    with caplog.at_level(logging.WARNING):
        read = sum(1 for _ in frames)
    frames.close()
    assert 0 < read < FRAMES
    assert (frames.frames_read, frames.declared_frames, frames.truncated) == (read, FRAMES, True)
    [message] = _warnings(caplog)
    assert f"{truncated}" in message and f"after {read} of {FRAMES} frames" in message and "truncated" in message


def test_max_frames_below_the_cut_does_not_warn(truncated: Path, caplog: pytest.LogCaptureFixture) -> None:
    frames = VideoFrames(truncated, max_frames=3)
    with caplog.at_level(logging.WARNING):
        assert sum(1 for _ in frames) == 3
    frames.close()
    assert not frames.truncated and not _warnings(caplog)


def test_intact_video_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    frames = VideoFrames(_write_avi(tmp_path / "clip.avi"))
    with caplog.at_level(logging.WARNING):
        assert sum(1 for _ in frames) == FRAMES
    frames.close()
    assert (frames.frames_read, frames.declared_frames, frames.truncated) == (FRAMES, FRAMES, False)
    assert not _warnings(caplog)


def test_no_declared_count_does_not_warn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A container that declares no count (OpenCV reports 0) gives nothing to compare with."""
    path = _write_avi(tmp_path / "clip.avi")
    real_capture = cv2.VideoCapture

    class NoCount:
        # A wrapper, not a subclass: subclassing OpenCV's extension type crashes the interpreter.
        def __init__(self, source: str) -> None:
            self._capture = real_capture(source)

        def get(self, prop: int) -> float:
            return 0.0 if prop == cv2.CAP_PROP_FRAME_COUNT else self._capture.get(prop)

        def __getattr__(self, name: str) -> object:
            return getattr(self._capture, name)

    monkeypatch.setattr(cv2, "VideoCapture", NoCount)
    frames = VideoFrames(path)
    with caplog.at_level(logging.WARNING):
        assert sum(1 for _ in frames) == FRAMES
    frames.close()
    assert frames.declared_frames is None and frames.total is None and not _warnings(caplog)
