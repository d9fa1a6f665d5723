"""A write that fails for want of space (a full disk, a quota, torch's stream writer giving up) raises an OSError
naming the file, the space left on its filesystem and what to do; the previous file stays as it was and no
temporary file is left. Other errors pass through unchanged."""
from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path
from typing import IO, Any

import pytest
import torch

from densekit.checkpoint.io import atomic_write
from densekit.checkpoint.train_state import save_checkpoint
from densekit.utils.files import atomic_save_json

GIB = 1 << 30
FREE = "1.5 GiB free"


def _report_little_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """The filesystem reports 1.5 GiB free (:data:`FREE`): the message must quote it."""
    usage = shutil.disk_usage(os.getcwd())._replace(free=3 * GIB // 2)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage)


def _fill_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, atomic_write's temporary file is created as usual, but its writes go to /dev/full, where the
    kernel answers every write with ENOSPC as a full filesystem does."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")

    def open_dev_full(fd: int, mode: str, encoding: str | None = None) -> IO[Any]:
        os.close(fd)
        return open("/dev/full", mode, encoding=encoding)

    monkeypatch.setattr(os, "fdopen", open_dev_full)
    _report_little_space(monkeypatch)


class _FillsUp(io.RawIOBase):
    """A file on a disk that fills after 1 kB: later writes raise ENOSPC, which torch.save turns into its stream
    writer's RuntimeError (``[enforce fail at inline_container.cc:...] unexpected pos ...``)."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.size + len(data) > 1024:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.size += len(data)
        return len(data)


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _assert_explains(err: OSError, path: Path) -> None:
    message = str(err)
    assert str(path) in message and FREE in message and "on its filesystem" in message
    assert f"previous {path.name} is unchanged" in message
    assert "Free some space, or choose another run directory / output path" in message


def test_checkpoint_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(1000)})
    before = _listing(tmp_path)
    _fill_disk(monkeypatch)
    with pytest.raises(OSError) as caught:
        save_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(100_000)})  # more than the file's buffer
    assert caught.value.errno == errno.ENOSPC and "No space left on device" in str(caught.value)
    _assert_explains(caught.value, tmp_path / "last.pth")
    assert _listing(tmp_path) == before  # the old checkpoint's bytes, and no temporary file


def test_torch_runtime_error_of_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save's own RuntimeError is the error raised; its OSError context gives the errno."""
    save_checkpoint(tmp_path, {"step": 1})
    before = _listing(tmp_path)
    monkeypatch.setattr(os, "fdopen", lambda fd, mode, encoding=None: (os.close(fd), _FillsUp())[1])
    _report_little_space(monkeypatch)
    with pytest.raises(OSError) as caught:
        save_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(10_000)})
    assert isinstance(caught.value.__cause__, RuntimeError) and "inline_container" in str(caught.value.__cause__)
    assert caught.value.errno == errno.ENOSPC and "No space left on device" in str(caught.value)
    _assert_explains(caught.value, tmp_path / "last.pth")
    assert _listing(tmp_path) == before


def test_json_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.json"
    path.write_text('{"old": 1}')
    _fill_disk(monkeypatch)
    with pytest.raises(OSError) as caught:
        atomic_save_json({"new": list(range(100))}, path)
    assert caught.value.errno == errno.ENOSPC
    _assert_explains(caught.value, path)
    assert _listing(tmp_path) == {"metrics.json": b'{"old": 1}'}


def test_torch_stream_writer_error_is_translated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The RuntimeError torch raises when it cannot write (no OSError behind it to take an errno from)."""
    path = tmp_path / "last.pth"
    torch.save({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def failing_save(obj: Any, f: IO[bytes]) -> None:
        f.write(b"partial")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:858] . "
            "PytorchStreamWriter failed writing file data/0: file write failed"
        )

    monkeypatch.setattr(torch, "save", failing_save)
    _report_little_space(monkeypatch)
    with pytest.raises(OSError) as caught:
        save_checkpoint(tmp_path, {"step": 2})
    assert "PytorchStreamWriter failed writing file" in str(caught.value)
    _assert_explains(caught.value, path)
    assert "7 B written before it failed" in str(caught.value)
    assert _listing(tmp_path) == {"last.pth": before}


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: an illegal memory access"),
    ConnectionResetError(errno.ECONNRESET, "reset"),
    FileNotFoundError(errno.ENOENT, "no such source"),
])
def test_other_errors_pass_unchanged(tmp_path: Path, error: BaseException) -> None:
    """A bug, or a failure to read what the block copies from, is not a full disk."""
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(type(error)) as caught:
        with atomic_write(path) as f:
            f.write(b"new")
            raise error
    assert caught.value is error
    assert _listing(tmp_path) == {"out.bin": b"old"}


def test_first_write_on_a_full_disk_says_no_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "runs" / "a" / "out.json"
    _fill_disk(monkeypatch)
    with pytest.raises(OSError, match=r"cannot write .*out\.json: No space left on device \(1\.5 GiB free") as caught:
        atomic_save_json({"x": 1}, path)
    assert "previous" not in str(caught.value)
    assert os.listdir(path.parent) == []
