"""Robustness-evaluation corruptions: ImageNet-C's Gaussian noise and blur, deterministic, on the eval images only."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import ndimage

from densekit.data.corruptions import GAUSSIAN_NOISE_STD, corrupt
from densekit.tasks.detection import build_coco_dataset


def _photo(h: int = 96, w: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 128.0)], axis=-1)
    image[30:60, 40:90] = [250, 20, 20]
    return image.astype(np.uint8)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_gaussian_noise_has_imagenet_c_std_and_is_deterministic(severity: int) -> None:
    grey = np.full((256, 256, 3), 128, np.uint8)  # mid-grey: the noise is not clipped at severities 1-3
    noisy = corrupt(grey, "gaussian_noise", severity)
    assert np.array_equal(noisy, corrupt(grey, "gaussian_noise", severity))  # same image, same noise
    diff = (noisy.astype(np.float64) - 128) / 255
    assert abs(diff.mean()) < 0.01
    expected = GAUSSIAN_NOISE_STD[severity - 1]
    assert diff.std() == pytest.approx(expected, rel=0.03 if severity <= 3 else 0.25)
    assert not np.array_equal(corrupt(_photo(), "gaussian_noise", 3)[:96, :128], noisy[:96, :128])


@pytest.mark.parametrize("severity, sigma", [(1, 1.0), (3, 3.0), (5, 6.0)])
def test_gaussian_blur_equals_scipys_gaussian_filter(severity: int, sigma: float) -> None:
    image = _photo()
    blurred = corrupt(image, "gaussian_blur", severity).astype(np.float64)
    # cv2 sizes the 8-bit kernel to +-3 sigma and mirrors edges without repeating them: scipy's 'mirror', truncate 3.
    ref = np.stack([ndimage.gaussian_filter(image[..., c].astype(np.float64), sigma, mode="mirror", truncate=3.0) for c in range(3)], -1)
    assert np.abs(blurred - ref).max() <= 2.0  # cv2 filters 8-bit images in fixed point
    assert np.abs(blurred - image).max() > 20


def test_unknown_corruption_and_severity_are_refused() -> None:
    with pytest.raises(ValueError, match="data.corruption must be one of gaussian_noise, gaussian_blur"):
        corrupt(_photo(), "fog", 3)
    with pytest.raises(ValueError, match="data.corruption_severity must be 1-5"):
        corrupt(_photo(), "gaussian_blur", 6)


def _dataset_files(tmp_path: Path) -> Path:
    (tmp_path / "val").mkdir()
    cv2.imwrite(str(tmp_path / "val" / "a.png"), cv2.cvtColor(_photo(), cv2.COLOR_RGB2BGR))
    ann = {
        "images": [{"id": 7, "file_name": "a.png", "height": 96, "width": 128}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [40, 30, 50, 30], "area": 1500, "iscrowd": 0}],
        "categories": [{"id": 3, "name": "box"}],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(ann))
    return tmp_path


def test_data_corruption_changes_the_eval_images_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _dataset_files(tmp_path)
    import densekit.tasks.detection as detection

    monkeypatch.setattr(detection, "coco_paths", lambda r, split: (Path(r) / split, Path(r) / "annotations" / f"instances_{split}.json"))
    base = dict(root=str(root), generate=False, augment=dict(hflip=0.0, scale_range=[1.0, 1.0], color_jitter=False))
    clean = build_coco_dataset(OmegaConf.create(base), "val", 128, train=False)
    noisy_cfg = OmegaConf.create({**base, "corruption": "gaussian_noise", "corruption_severity": 2})
    noisy = build_coco_dataset(noisy_cfg, "val", 128, train=False)
    (x, t), (y, u) = clean[0], noisy[0]
    assert x.shape == y.shape and not np.array_equal(x.numpy(), y.numpy())
    assert np.array_equal(t["boxes"].numpy(), u["boxes"].numpy()) and t["scale"] == u["scale"]
    assert np.array_equal(y.numpy(), noisy[0][0].numpy())  # every evaluation sees the same corrupted image
    train = build_coco_dataset(noisy_cfg, "val", 128, train=True)  # training images are never corrupted
    assert "Corrupt" not in repr(train.transform)
