"""Every kind of file densekit writes goes through ``atomic_write``: when the write fails at its last step (the
fsync before the rename), the previous file is still there, unchanged, and no temporary file is left behind.

A writer that wrote in place (``cv2.imwrite``, ``Path.write_text``, ``torch.save(obj, path)``) would have replaced
the old content before failing, so these tests tell the two apart.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from densekit.checkpoint.train_state import save_checkpoint
from densekit.data.synthetic import ensure_synthetic_coco
from densekit.data.synthetic_cityscapes import ensure_synthetic_cityscapes
from densekit.evaluation.cityscapes import write_predictions
from densekit.evaluation.coco import write_results_json, write_test_dev_submission
from densekit.utils.files import atomic_save_json
from densekit.utils.visualize import save_image


def _results(version: int) -> list[dict]:
    return [{"image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 2.0, 3.0], "score": 0.5 + version / 10}]


# Each writer writes `version` (0, then 1) into a folder.
WRITERS: dict[str, Callable[[Path, int], object]] = {
    "training checkpoint": lambda d, v: save_checkpoint(d, {"step": v, "w": torch.full((3,), float(v))}, keep_step_copy=True),
    "json (atomic_save_json)": lambda d, v: atomic_save_json({"version": v}, d / "metrics.json"),
    "coco results json": lambda d, v: write_results_json(_results(v), d / "results.json"),
    "coco test-dev zip": lambda d, v: write_test_dev_submission(_results(v), d, "tiny"),
    "jpeg (save_image)": lambda d, v: save_image(d / "vis.jpg", np.full((8, 8, 3), 40 * v, np.uint8)),
    "cityscapes prediction png": lambda d, v: write_predictions(
        [{"sem_seg": torch.full((4, 4), v)}], [{"file": "a_000000_000000_leftImg8bit.png", "orig_size": (4, 4)}], d
    ),
    "synthetic coco jpegs and json": lambda d, v: ensure_synthetic_coco(d, num_train=1, num_val=0, seed=v),
    "synthetic cityscapes pngs, json and marker": lambda d, v: ensure_synthetic_cityscapes(
        d, num_train=0, num_val=1, size=(32, 64), seed=v
    ),
}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write = WRITERS[kind]
    write(tmp_path, 0)
    before = _snapshot(tmp_path)
    assert before and not [name for name in before if name.endswith(".tmp")]

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write(tmp_path, 1)
    assert _snapshot(tmp_path) == before  # same files, same bytes: nothing half-written, no temp file
    monkeypatch.undo()
    write(tmp_path, 1)  # and the writer still works: the new content replaces the old
    after = _snapshot(tmp_path)
    assert set(before) <= set(after) and after != before  # (a step copy of the new step joins the old one)
    assert not [name for name in after if name.endswith(".tmp")]
