"""data=custom errors (the working paths are run by test_custom_data_doc.py, which runs docs/custom_data.md)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = ["model=efficientdet_d0", "model.neck.repeats=1", "model.neck.channels=16", "model.head.repeats=1"]


def custom_data(paths: dict, val: bool = True) -> list[str]:
    keys = [f"data.train_images={paths['images']}", f"data.train_annotations={paths['train']}"]
    if val:
        keys += [f"data.val_images={paths['images']}", f"data.val_annotations={paths['val']}"]
    return ["data=custom", "data.image_size=128", "data.augment.scale_range=[0.8,1.2]", *keys]


def test_a_split_without_paths_is_named_with_the_keys_to_set(custom_coco, tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), *TINY_MODEL, *custom_data(custom_coco, val=False),
           "train.max_steps=1", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "data.val_images" in done.stderr and "data.val_annotations" in done.stderr

