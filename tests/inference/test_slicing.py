"""Sliced inference: tiles cover the image, boxes come back in original pixels, an object cut by a seam is one box,
and small objects a downscaled single pass cannot resolve are found."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from blobs import BlobDetector, paint
from torchvision.ops import box_iou

import densekit
from densekit.inference.slicing import SlicedDetector, SliceSettings, tile_starts, tile_windows

TINY = {"neck": {"repeats": 1, "channels": 16}, "head": {"repeats": 1}}


@pytest.mark.parametrize("length, tile, overlap", [(1024, 512, 0.2), (2000, 512, 0.25), (700, 256, 0.0), (300, 512, 0.2)])
def test_tiles_cover_the_image_overlap_and_end_at_the_border(length: int, tile: int, overlap: float) -> None:
    starts = tile_starts(length, tile, overlap)
    extent = min(tile, length)
    covered = np.zeros(length, bool)
    for start in starts:
        assert 0 <= start and start + extent <= length
        covered[start:start + extent] = True
    assert covered.all() and starts[-1] + extent == length
    assert all(a + extent - b >= int(overlap * tile) for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap
    assert tile_starts(1024, 512, 0.2) == [0, 409, 512]


def test_an_object_cut_by_a_seam_comes_out_once_in_original_pixels() -> None:
    image = torch.zeros(3, 1024, 1024)
    obj = (490, 100, 530, 140)  # tile 0 ends at x=512, cutting it; tile 1 (x 409-921) sees it whole
    paint(image, obj)
    assert [w for w in tile_windows(1024, 1024, SliceSettings((512, 512))) if w[0] == 0] == [
        (0, 0, 512, 512), (0, 409, 512, 921), (0, 512, 512, 1024)]
    sliced = SlicedDetector(BlobDetector(), SliceSettings((512, 512), full_image=False), input_size=512)
    out = sliced([image])[0]
    assert out["boxes"].tolist() == [list(map(float, obj))]
    plain_nms = SlicedDetector(BlobDetector(), SliceSettings((512, 512), full_image=False, merge="nms"), input_size=512)
    # NMS at IoU 0.5 keeps the 18 px cut part (IoU 0.45 with the whole): the duplicate the greedy merge removes
    assert plain_nms([image])[0]["boxes"].tolist() == [[512, 100, 530, 140], [490, 100, 530, 140]]


def test_an_object_larger_than_a_tile_is_one_box_with_the_full_image_pass() -> None:
    image = torch.zeros(3, 1024, 1024)
    obj = (100, 600, 800, 900)  # 700 px wide: no 512 px tile holds it
    paint(image, obj, channel=1)
    out = SlicedDetector(BlobDetector(), SliceSettings((512, 512)), input_size=512)([image])[0]
    assert len(out["boxes"]) == 1 and out["labels"].tolist() == [1]
    torch.testing.assert_close(out["boxes"][0], torch.tensor(obj, dtype=torch.float32), atol=2.5, rtol=0)


def test_small_objects_are_found_in_tiles_that_a_single_downscaled_pass_misses() -> None:
    rng = np.random.default_rng(0)
    image = torch.zeros(3, 2048, 2048)
    truth = []
    for row in range(5):
        for col in range(5):
            x, y = 80 + col * 400 + int(rng.integers(0, 60)), 80 + row * 400 + int(rng.integers(0, 60))
            truth.append((x, y, x + 14, y + 14))
            paint(image, truth[-1])
    detector = BlobDetector(min_side=8)  # resolves objects of 8 input pixels and more
    single = SlicedDetector(detector, SliceSettings((2048, 2048)), input_size=512)([image])[0]  # one 4x-downscaled pass
    sliced = SlicedDetector(detector, SliceSettings((512, 512), overlap=0.2), input_size=512)([image])[0]

    def recall(found: dict[str, torch.Tensor]) -> float:
        if len(found["boxes"]) == 0:
            return 0.0
        return float((box_iou(torch.tensor(truth, dtype=torch.float32), found["boxes"]).max(dim=1).values >= 0.5).float().mean())

    assert recall(single) == 0.0 and recall(sliced) == 1.0 and len(sliced["boxes"]) == len(truth)


def test_predictor_slicing_matches_the_plain_path_on_an_image_of_one_tile_and_stays_in_the_image(randomise) -> None:
    torch.manual_seed(0)
    model = densekit.create_model("efficientdet_d0", num_classes=3, **TINY).eval()
    randomise(model, seed=7)
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)  # the input size: no resize, no padding either way
    plain = densekit.Predictor(model, image_size=128, score_threshold=0.0)(small)
    sliced = densekit.Predictor(model, image_size=128, score_threshold=0.0, slicing=[128, 128])(small)
    assert len(plain) > 10 and len(sliced) == len(plain)
    np.testing.assert_allclose(sliced.boxes, plain.boxes, atol=1e-3)
    large = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    out = densekit.Predictor(model, image_size=128, score_threshold=0.2, slicing=[128, 128])(large)
    assert (out.width, out.height) == (500, 300) and len(out) <= 100
    assert (out.boxes[:, 0::2] <= 500).all() and (out.boxes[:, 1::2] <= 300).all() and (out.boxes >= 0).all()
    assert (out.scores >= 0.2).all()


def test_settings_from_config_and_errors() -> None:
    assert SliceSettings.from_config({"slice": None}) is None
    got = SliceSettings.from_config({"slice": [640, 480], "slice_overlap": 0.25, "batch_size": 2})
    assert got == SliceSettings((640, 480), overlap=0.25, batch_size=2)
    assert SliceSettings.from_config({"slice": 512}).size == (512, 512)
    with pytest.raises(ValueError, match="slice_overlap"):
        SliceSettings((512, 512), overlap=1.0)
    with pytest.raises(ValueError, match="slice_merge='wbf'"):
        SliceSettings((512, 512), merge="wbf")


def test_cut_by_tile_marks_only_inner_borders() -> None:
    from densekit.inference.slicing import cut_by_tile

    boxes = torch.tensor([[0.0, 10, 30, 40], [480, 10, 512, 40], [100, 100, 200, 200]])
    cut = cut_by_tile(boxes, (0, 0, 512, 512), 1024, 1024)  # the top-left tile of a 1024 px image
    assert cut.tolist() == [False, True, False]  # the image's own border (x=0) cuts nothing
