"""``densekit.Predictor``, the notebook twin of tools/predict.py: input forms, segmentation at the photo's size,
and clear errors for images a model cannot take (NaN / inf, out-of-range floats, missing files)."""
from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
import torch
from skimage import data as photos

import densekit
from densekit.deploy.predictions import SegmentationMap


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    return np.ascontiguousarray(cv2.resize(photos.chelsea(), (128, 96), interpolation=cv2.INTER_AREA))


@pytest.fixture(scope="module")
def segmenter(randomise) -> torch.nn.Module:
    torch.manual_seed(0)
    model = densekit.create_model("lraspp_mobilenet_v3_small", num_classes=5).eval()
    randomise(model, seed=1)
    return model


def test_segmentation_is_at_the_photo_size_and_equals_the_model(segmenter, cat: np.ndarray) -> None:
    result = densekit.Predictor(segmenter)(cat)
    assert isinstance(result, SegmentationMap) and result.label_map.shape == (96, 128)
    with torch.inference_mode():
        want = segmenter(torch.from_numpy(cat).permute(2, 0, 1)[None].float() / 255)[0]["sem_seg"].numpy()
    assert (result.label_map == want).mean() > 0.999  # BN folding changes float rounding only
    assert sum(result.class_fractions().values()) == pytest.approx(1.0)


def test_resized_segmentation_comes_back_at_the_photo_size(segmenter, cat: np.ndarray) -> None:
    full = densekit.Predictor(segmenter, optimize=False)(cat)
    same = densekit.Predictor(segmenter, optimize=False, image_size=[96, 128])(cat)  # a resize that changes nothing
    np.testing.assert_array_equal(same.label_map, full.label_map)
    small = densekit.Predictor(segmenter, image_size=[64, 96])(cat)
    assert small.label_map.shape == (96, 128) and small.label_map.max() < 5


def test_tensor_float_and_batch_inputs_give_the_same_answer(segmenter, cat: np.ndarray) -> None:
    predictor = densekit.Predictor(segmenter, batch_size=2)
    from_uint8 = predictor(cat).label_map
    as_tensor = torch.from_numpy(cat).permute(2, 0, 1)
    as_float = cat.astype(np.float32) / 255
    for other in (predictor(as_tensor), predictor(as_float), *predictor(np.stack([cat, cat, cat]))):
        np.testing.assert_array_equal(other.label_map, from_uint8)


def test_bad_images_are_refused_with_their_name(segmenter, cat: np.ndarray, tmp_path) -> None:
    predictor = densekit.Predictor(segmenter)
    broken = cat.astype(np.float32) / 255
    broken[3, 4, 1] = np.nan
    with pytest.raises(ValueError, match=r"frame 7 has 1 NaN or infinite pixel values"):
        predictor.predict([cat, broken], names=["frame 6", "frame 7"])
    span = f"got {cat.min()}..{cat.max()}"
    with pytest.raises(ValueError, match=re.escape(f"image 0: float pixels must lie in [0, 1], {span}")):
        predictor(cat.astype(np.float32))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        predictor(tmp_path / "missing.jpg")


def test_overlay_tints_each_class_apart_and_leaves_ignored_pixels_alone(cat: np.ndarray) -> None:
    from densekit.utils.visualize import overlay_segmentation

    labels = np.repeat(np.arange(8), 16)[None].repeat(96, 0)  # eight 16-px columns, classes 0-7
    labels[60:, 64:] = 255  # bottom right, away from the legend (top left)
    drawn = overlay_segmentation(cat, labels, [f"c{i}" for i in range(8)], alpha=1.0)
    np.testing.assert_array_equal(drawn[60:, 64:], cv2.cvtColor(cat, cv2.COLOR_RGB2BGR)[60:, 64:])
    colors = drawn[2, 8::16].astype(int)  # above the legend, one pixel per class
    gaps = np.abs(colors[:, None] - colors[None]).sum(-1)[~np.eye(8, dtype=bool)]
    assert gaps.min() > 60  # consecutive labels get distinguishable colours
