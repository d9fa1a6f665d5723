"""data.decoder: OpenCV, torchvision.io and PIL give the same RGB pixels, and the same clear errors."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from densekit.data.decode import DECODERS, decode_file


def photo(seed: int = 0) -> np.ndarray:
    """A 60x80 RGB picture with smooth structure and colour (not symmetric in the channels, so BGR/RGB mixups show)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    rgb = cv2.resize(small, (80, 60), interpolation=cv2.INTER_CUBIC)
    rgb[..., 0] = 250  # a saturated red channel
    return rgb


def test_every_decoder_reads_a_png_exactly(tmp_path: Path) -> None:
    rgb = photo()
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    for name in DECODERS:
        decoded = decode_file(path, name)
        assert decoded.dtype == np.uint8 and decoded.shape == (60, 80, 3), name
        assert np.array_equal(decoded, rgb), name


def test_decoders_agree_on_a_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(photo(1), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    reference = decode_file(path, "opencv").astype(np.int16)
    assert reference[..., 0].mean() > 200  # RGB order
    for name in DECODERS:  # libjpeg builds may differ in IDCT / chroma upsampling by a grey level or so
        assert np.abs(decode_file(path, name).astype(np.int16) - reference).mean() < 1.5, name


def test_missing_corrupt_and_unknown_decoder_are_clear_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    for name in DECODERS:
        with pytest.raises(FileNotFoundError, match="missing.jpg does not exist"):
            decode_file(tmp_path / "missing.jpg", name)
        with pytest.raises(OSError, match=f"cannot decode image file .*broken.jpg .* with {name}"):
            decode_file(broken, name)
    with pytest.raises(ValueError, match="data.decoder must be one of opencv, torchvision, pil"):
        decode_file(broken, "turbojpeg")
