"""Train / eval transforms: scale round trip, padding, box clipping and dropping, seeding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from densekit.data import build_eval_transform, build_train_transform
from densekit.data.transforms import DEFAULT_FILL

FILL = torch.tensor(DEFAULT_FILL, dtype=torch.float32) / 255


def _object_image(h: int, w: int, box: list[int]) -> np.ndarray:
    """Dark image with one bright rectangle exactly covering ``box`` (xyxy)."""
    image = np.full((h, w, 3), 20, np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 250
    return image


def _bright_extent(image: torch.Tensor) -> np.ndarray | None:
    """xyxy of the pixels brighter than mid-grey (anti-aliased edges count as half)."""
    bright = (image.mean(0) > 0.5).numpy()
    if not bright.any():
        return None
    rows, cols = np.flatnonzero(bright.any(1)), np.flatnonzero(bright.any(0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


@pytest.mark.parametrize("h, w, size", [(48, 64, 128), (64, 48, 32), (37, 101, 256), (300, 200, 128)])
def test_eval_scale_roundtrip(h, w, size):
    boxes = np.array([[0, 0, w, h], [3.5, 2.25, w / 2, h / 3], [w - 5, h - 4, w, h]], dtype=np.float32)
    labels = np.array([0, 3, 1], dtype=np.int64)
    transform = build_eval_transform(size)
    image, out_boxes, out_labels, scale, resized = transform(_object_image(h, w, [0, 0, 1, 1]), boxes, labels)
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert scale == pytest.approx(size / max(h, w))
    assert max(resized) == size and resized == (round(h * scale), round(w * scale))
    assert out_labels.tolist() == labels.tolist() and out_labels.dtype == np.int64
    # Dividing by scale maps back to original pixels: exact along the long side, within half an input pixel
    # (the rounding of the short side) along the other.
    np.testing.assert_allclose(out_boxes / scale, boxes, atol=0.5 / scale + 1e-3)
    if (h * scale).is_integer() and (w * scale).is_integer():
        np.testing.assert_allclose(out_boxes / scale, boxes, atol=1e-3)
    # Padding is bottom / right only, with the fill colour.
    rh, rw = resized
    assert torch.allclose(image[:, rh:, :], FILL[:, None, None].expand(3, size - rh, size), atol=1e-6)
    assert torch.allclose(image[:, :, rw:], FILL[:, None, None].expand(3, size, size - rw), atol=1e-6)


def test_eval_transform_keeps_no_boxes():
    image, boxes, labels, scale, _ = build_eval_transform(64)(
        np.zeros((30, 40, 3), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    )
    assert boxes.shape == (0, 4) and labels.shape == (0,) and scale == 64 / 40


def test_train_boxes_inside_and_match_object():
    h, w, size = 90, 120, 96
    box = [30, 20, 70, 60]
    transform = build_train_transform(size, scale_range=(0.5, 2.0), hflip=0.5, color_jitter=False)
    transform.set_random_seed(0)
    image_np = _object_image(h, w, box)
    kept = 0
    for _ in range(40):
        image, boxes, labels, scale, resized = transform(image_np, np.array([box], np.float32), np.array([4]))
        assert image.shape == (3, size, size)
        assert 0.5 * size - 1 <= scale * max(h, w) <= 2.0 * size + 1
        assert resized == (min(size, round(h * scale)), min(size, round(w * scale)))
        assert len(boxes) == len(labels) <= 1
        rh, rw = resized
        # Outside the resized image there is only padding.
        assert torch.allclose(image[:, rh:, :], FILL[:, None, None].expand(3, size - rh, size), atol=1e-6)
        assert torch.allclose(image[:, :, rw:], FILL[:, None, None].expand(3, size, size - rw), atol=1e-6)
        extent = _bright_extent(image)
        if len(boxes) == 0:
            # Dropped only when (almost) cropped away: less than a quarter of the object may be visible.
            visible = 0.0 if extent is None else np.prod(extent[2:] - extent[:2])
            assert visible < 0.25 * (40 * scale) ** 2 + 4 * 40 * scale
            continue
        kept += 1
        assert labels.tolist() == [4]
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= rw).all() and (boxes[:, 3] <= rh).all()
        assert (boxes[:, 2:] - boxes[:, :2] >= 1).all()
        assert extent is not None
        np.testing.assert_allclose(boxes[0], extent, atol=1.5)
    assert kept >= 10


def test_train_hflip_mirrors_box():
    h, w, size = 50, 100, 100
    transform = build_train_transform(size, scale_range=(1.0, 1.0), hflip=1.0)
    image, boxes, *_ = transform(_object_image(h, w, [10, 5, 30, 25]), np.array([[10, 5, 30, 25]]), np.array([0]))
    np.testing.assert_allclose(boxes, [[70, 5, 90, 25]], atol=1e-3)
    np.testing.assert_allclose(_bright_extent(image), boxes[0], atol=1e-3)


def test_train_drops_degenerate_boxes_with_labels():
    # At 0.1x a 5 px box becomes half a pixel: dropped together with its label; the big one stays.
    transform = build_train_transform(100, scale_range=(0.1, 0.1), hflip=0.0)
    boxes = np.array([[0, 0, 5, 5], [10, 10, 90, 90]], np.float32)
    _, out_boxes, out_labels, scale, resized = transform(np.zeros((100, 100, 3), np.uint8), boxes, np.array([1, 2]))
    assert scale == pytest.approx(0.1) and resized == (10, 10)
    assert out_labels.tolist() == [2]
    np.testing.assert_allclose(out_boxes, [[1, 1, 9, 9]], atol=1e-3)


def test_train_drops_mostly_cropped_boxes():
    transform = build_train_transform(100, scale_range=(2.0, 2.0), hflip=0.0, min_visibility=0.25)
    transform.set_random_seed(1)
    for _ in range(30):  # 200 x 200 after resizing: the crop offset decides how much of the corner box is left
        _, boxes, labels, *_ = transform(np.zeros((100, 100, 3), np.uint8), np.array([[0, 0, 10, 10]]), np.array([0]))
        assert len(boxes) == len(labels)
        if len(boxes):
            assert np.prod(boxes[0, 2:] - boxes[0, :2]) >= 0.25 * 400 - 1e-3


def test_train_seeding():
    transform = build_train_transform(64)
    args = (np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8), np.array([[5, 5, 30, 30]]),
            np.array([1]))

    def run(seed: int) -> list:
        transform.set_random_seed(seed)
        return [transform(*args) for _ in range(3)]

    a, b, c = run(0), run(0), run(1)
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0]) and x[3] == y[3]
    assert any(x[3] != z[3] for x, z in zip(a, c))


def test_input_validation():
    with pytest.raises(ValueError, match="uint8 RGB"):
        build_eval_transform(32)(np.zeros((10, 10), np.uint8), np.zeros((0, 4)), np.zeros(0))
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        build_eval_transform(32)(np.zeros((10, 10, 3), np.uint8), np.zeros((2, 4)), np.zeros(1))
    with pytest.raises(ValueError, match="scale_range"):
        build_train_transform(32, scale_range=(2.0, 1.0))
