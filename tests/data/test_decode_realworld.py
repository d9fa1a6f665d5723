"""Real-world files (issue 23): truncated JPEGs, EXIF orientation, formats one decoder lacks, palette PNG labels."""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from densekit.data import decode
from densekit.data.cityscapes import read_label
from densekit.data.decode import DECODERS, decode_file


def photo(h: int = 60, w: int = 80, seed: int = 0) -> np.ndarray:
    """An RGB picture with smooth structure, not symmetric in the channels or under any rotation / flip."""
    rng = np.random.default_rng(seed)
    rgb = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    rgb[:10, :10] = (250, 0, 0)  # a red top-left corner shows the orientation
    return rgb


def test_truncated_jpeg_decodes_in_every_decoder_with_one_warning(tmp_path: Path, caplog) -> None:
    whole = tmp_path / "whole.jpg"
    cv2.imwrite(str(whole), cv2.cvtColor(photo(), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    reference = decode_file(whole).astype(np.int16)
    for name in DECODERS:
        cut = tmp_path / f"cut_{name}.jpg"  # a file per decoder: the warning is once per file and process
        cut.write_bytes(whole.read_bytes()[:-20])
        with caplog.at_level(logging.WARNING, logger=decode.__name__):
            caplog.clear()
            image = decode_file(cut, name)
            decode_file(cut, name)  # read again (next epoch): no second warning
        assert image.shape == (60, 80, 3) and np.abs(image.astype(np.int16) - reference).mean() < 3, name
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and str(cut) in warnings[0] and "truncated / partly decoded" in warnings[0], name
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # scoped to the call, not left on
    empty_jpeg = tmp_path / "header_only.jpg"
    empty_jpeg.write_bytes(whole.read_bytes()[:2])
    for name in DECODERS:
        with pytest.raises(OSError, match=f"cannot decode image file .*header_only.jpg .* with {name}"):
            decode_file(empty_jpeg, name)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_gives_the_displayed_frame_in_every_decoder(tmp_path: Path, orientation: int) -> None:
    rgb = photo()
    path = tmp_path / f"exif{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, quality=95, exif=exif)
    # Orientation 3: rotated 180; 6: displayed = stored rotated 90 clockwise; 8: 90 counter-clockwise.
    turns = {3: 2, 6: -1, 8: 1}[orientation]  # np.rot90 turns counter-clockwise
    expected = np.rot90(rgb, turns).astype(np.int16)
    stored = decode_file(path, "opencv", exif=False).astype(np.int16)
    assert stored.shape == rgb.shape and np.abs(stored - rgb).mean() < 3
    for name in DECODERS:
        displayed = decode_file(path, name).astype(np.int16)
        assert displayed.shape == expected.shape and np.abs(displayed - expected).mean() < 3, name
        assert np.abs(decode_file(path, name, exif=False).astype(np.int16) - stored).mean() < 1.5, name
    reference = decode_file(path, "opencv")
    for name in DECODERS:
        assert np.abs(decode_file(path, name).astype(np.int16) - reference).mean() < 1.5, name


def test_16bit_png_and_bmp_give_the_opencv_pixels_in_every_decoder(tmp_path: Path) -> None:
    rgb = photo()
    grey16 = (np.arange(60 * 80).reshape(60, 80) * 13).astype(np.uint16)
    files = {"rgb16.png": (rgb[..., ::-1].astype(np.uint16) * 257), "grey16.png": grey16,
             "a.bmp": rgb[..., ::-1]}
    for file, pixels in files.items():
        cv2.imwrite(str(tmp_path / file), pixels)
        reference = decode_file(tmp_path / file, "opencv")
        assert reference.dtype == np.uint8 and reference.shape == (60, 80, 3)
        for name in DECODERS:
            image = decode_file(tmp_path / file, name)
            assert image.dtype == np.uint8 and np.array_equal(image, reference), (file, name)


def test_palette_png_labels_read_as_class_indices(tmp_path: Path) -> None:
    classes = np.random.default_rng(0).integers(0, 21, (30, 40)).astype(np.uint8)
    classes[:2] = 255  # VOC's ignored boundary
    voc = Image.fromarray(classes, mode="P")
    palette = np.random.default_rng(1).integers(0, 256, (256, 3)).astype(np.uint8)
    voc.putpalette(palette.ravel().tolist())
    voc.save(tmp_path / "voc.png")
    label = read_label(tmp_path / "voc.png")
    assert label.dtype == np.uint8 and np.array_equal(label, classes)
    cv2.imwrite(str(tmp_path / "colour.png"), palette[classes])  # an RGB visualisation is still refused
    with pytest.raises(OSError, match="colour.png is uint8 with shape .30, 40, 3.; expected a single-channel"):
        read_label(tmp_path / "colour.png")


def test_exif_rotated_photo_in_a_coco_json_and_the_converter_size(tmp_path: Path) -> None:
    """A sideways-stored phone photo: the converters record its displayed size, the dataset loads it upright; a json
    written for the stored frame is refused naming EXIF and the switch, which loads it in that frame."""
    import json

    from densekit.data.coco import CocoDetection
    from densekit.data.converters.common import image_size

    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 60x80 (HxW), displayed 80x60
    Image.fromarray(photo()).save(path, quality=95, exif=exif)
    assert image_size(path) == (80, 60) and image_size(path, exif=False) == (60, 80)

    def coco(height: int, width: int) -> Path:
        ann = tmp_path / f"ann_{height}x{width}.json"
        ann.write_text(json.dumps({
            "images": [{"id": 1, "file_name": path.name, "height": height, "width": width}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}))
        return ann

    image, target = CocoDetection(tmp_path, coco(80, 60))[0]
    assert tuple(image.shape[-2:]) == (80, 60) and target["orig_size"] == (80, 60)
    with pytest.raises(ValueError, match="EXIF orientation rotates it: the json describes the stored frame; .* "
                                         "data.exif_orientation=false"):
        CocoDetection(tmp_path, coco(60, 80))[0]
    image, _ = CocoDetection(tmp_path, coco(60, 80), exif=False)[0]
    assert tuple(image.shape[-2:]) == (60, 80)
