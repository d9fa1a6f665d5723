"""The one checkpoint reader (``weights_only``, errors naming the file) and the one atomic writer."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from densekit.checkpoint.io import CheckpointError, atomic_write, read_checkpoint, read_state_dict, state_dict_from


class NotWeights:
    """A pickled object that ``weights_only=True`` must refuse to build."""


def test_read_checkpoint_returns_what_the_file_holds(tmp_path: Path) -> None:
    path = tmp_path / "run.pth"
    torch.save({"model": {"module.w": torch.ones(2)}, "step": 3, "config": {"model": {"num_classes": 4}}}, path)
    state = read_checkpoint(path)
    assert state["step"] == 3 and state["config"]["model"]["num_classes"] == 4
    assert list(state_dict_from(state, path)) == ["w"] == list(read_state_dict(path))  # unwrapped, DDP prefix gone


def test_state_dict_wrappers_and_refusals_name_the_file(tmp_path: Path) -> None:
    t = torch.zeros(1)
    assert state_dict_from({"state_dict": {"a": t}, "epoch": 1}, "x.pth") == {"a": t}
    assert state_dict_from({"a": t, "note": "kept out"}, "x.pth") == {"a": t}
    with pytest.raises(CheckpointError, match=r"x\.pth holds no state_dict \(found list\)"):
        state_dict_from([t], "x.pth")


def test_missing_corrupt_and_unsafe_files_are_refused_with_their_name(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint file not found: .*missing\.pth"):
        read_checkpoint(tmp_path / "missing.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*broken\.pth"):
        read_checkpoint(broken)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"obj": NotWeights()}, unsafe)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*unsafe\.pth"):
        read_checkpoint(unsafe)


def test_atomic_write_fsyncs_then_replaces_with_a_plain_file_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sub" / "out.bin"  # parent folders are created
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    with atomic_write(path) as f:
        f.write(b"new")
        assert not path.exists()  # nothing appears under the name before the block ends
    assert path.read_bytes() == b"new" and len(synced) == 1
    assert os.listdir(path.parent) == ["out.bin"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    with atomic_write(path, "w") as f:
        f.write("text, é")
    assert path.read_bytes() == "text, é".encode()


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as f:
            f.write(b"partial")
            raise KeyboardInterrupt  # killed mid-write
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_concurrent_writers_of_one_path_do_not_share_a_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    with atomic_write(path) as a, atomic_write(path) as b:
        assert len(os.listdir(tmp_path)) == 2  # two unique temp files, not one fixed name
        a.write(b"A" * 1000)
        b.write(b"B" * 1000)
    assert path.read_bytes() == b"A" * 1000  # the last rename wins, with one writer's whole content

    payloads = [bytes([65 + i]) * 100_000 for i in range(4)]

    def write_many(data: bytes) -> None:
        for _ in range(10):
            with atomic_write(path) as f:
                f.write(data)

    threads = [threading.Thread(target=write_many, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in payloads and os.listdir(tmp_path) == ["out.bin"]
