"""Image decoding for the datasets: OpenCV (default), torchvision.io (libjpeg-turbo) or PIL, same pixels.

``data.decoder`` picks one; ``benchmarks/train_benchmark.py bench.decoders=[...]`` times them through the full train
transform on COCO-sized JPEGs (docs/benchmarks.md). All three return ``uint8`` RGB ``[H, W, 3]``, and the same pixels
for the same file:

- **EXIF orientation** is applied by default: images come in the *displayed* frame, the one every image viewer shows
  (as PIL's ``ImageOps.exif_transpose``, detectron2 and ultralytics do), so a phone photo stored sideways with an
  EXIF rotation is upright, and its boxes, masks and predictions are in that frame. ``decode_file(..., exif=False)``
  keeps the *stored* frame, for datasets annotated on the raw pixel grid (e.g. with a tool that ignores EXIF).
- **Truncated files**: a JPEG with missing bytes at the end, which libjpeg decodes with a warning ("Premature end of
  JPEG file") and viewers show, is decoded by every decoder (what is missing is filled in by libjpeg), with one log
  warning naming the file. A file that no decoder can read raises ``OSError`` naming it.
- **Formats one decoder lacks**: the torchvision and PIL decoders fall back to the OpenCV decoder for what they cannot
  decode or would convert differently (BMP/TIFF in torchvision.io, 16-bit PNGs), so the pixels match OpenCV's.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

__all__ = ["DECODERS", "check_decoder", "decode_file", "read_image"]

log = logging.getLogger(__name__)

# Files already reported as truncated in this process, so a file read every epoch is reported once.
_warned: set[str] = set()


def _warn_partial(path: Path, how: str) -> None:
    key = str(path)
    if key not in _warned:
        _warned.add(key)
        log.warning("image file %s is truncated / partly decoded (%s); what is missing is filled in, check the file",
                    path, how)


def _opencv(path: Path, exif: bool = True) -> np.ndarray | None:
    flags = cv2.IMREAD_COLOR if exif else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    data = np.fromfile(path, dtype=np.uint8)  # not cv2.imread first, which cannot tell "missing" from "corrupt"
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None and data.size:
        # cv2.imdecode (OpenCV 5) refuses a JPEG with missing bytes at the end; cv2.imread decodes it with libjpeg's
        # "Premature end of JPEG file", as viewers do. decode_file has checked that the file exists.
        image = cv2.imread(str(path), flags)
        if image is not None:
            _warn_partial(path, "cv2.imdecode refused it, cv2.imread decoded it")
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _torchvision(path: Path, exif: bool = True) -> np.ndarray | None:
    import torch
    import torchvision.io as tio

    try:
        image = tio.decode_image(tio.read_file(str(path)), mode=tio.ImageReadMode.RGB, apply_exif_orientation=exif)
    except RuntimeError:  # truncated JPEG, BMP, TIFF, ...: what OpenCV decodes, the OpenCV decoder decodes
        return _opencv(path, exif)
    if image.dtype != torch.uint8:  # 16-bit PNG: OpenCV's conversion to 8 bits
        return _opencv(path, exif)
    return image.permute(1, 2, 0).numpy()


def _pil(path: Path, exif: bool = True) -> np.ndarray | None:
    from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

    def load() -> np.ndarray | None:
        with Image.open(path) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                return None  # 16-bit / float: PIL's convert("RGB") clips where OpenCV scales; use OpenCV's pixels
            im.load()
            return np.asarray((ImageOps.exif_transpose(im) if exif else im).convert("RGB"))

    try:
        image = load()
        return _opencv(path, exif) if image is None else image
    except (UnidentifiedImageError, SyntaxError):
        return _opencv(path, exif)  # a format PIL lacks, or a broken file (then OpenCV returns None too)
    except OSError as error:
        if "truncated" not in str(error):
            return _opencv(path, exif)
    # A truncated file: decode what is there, with the flag scoped to this call (PIL has no per-image switch).
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        image = load()
    except (UnidentifiedImageError, OSError, SyntaxError):
        return _opencv(path, exif)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    if image is not None:
        _warn_partial(path, "PIL decoded it with LOAD_TRUNCATED_IMAGES")
    return image


#: ``data.decoder`` name -> function ``(path, exif)`` returning RGB uint8, or None when the file cannot be decoded.
DECODERS: dict[str, Callable[[Path, bool], np.ndarray | None]] = {
    "opencv": _opencv, "torchvision": _torchvision, "pil": _pil,
}


def check_decoder(decoder: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``decoder`` is a key of :data:`DECODERS`."""
    if decoder not in DECODERS:
        raise ValueError(f"data.decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")


def decode_file(path: str | Path, decoder: str = "opencv", exif: bool = True) -> np.ndarray:
    """Decode an image file to ``uint8`` RGB ``[H, W, 3]`` with ``decoder`` (a key of :data:`DECODERS`).

    Args:
        path: The image file.
        decoder: ``"opencv"``, ``"torchvision"`` or ``"pil"``; all give the same pixels (see the module docstring).
        exif: Apply the EXIF orientation (the displayed frame, default); ``False`` keeps the stored pixel frame.

    A truncated file that libjpeg decodes with a warning is returned, with one log warning naming it.

    Raises:
        ValueError: unknown ``decoder``.
        FileNotFoundError: The file does not exist.
        OSError: The file cannot be decoded. Both are plain exception types so the message survives the re-raise
            in the main process when the error happens in a DataLoader worker.
    """
    check_decoder(decoder)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    image = DECODERS[decoder](path, exif)
    if image is None:
        raise OSError(f"cannot decode image file {path} ({path.stat().st_size} bytes) with {decoder}: not a readable image")
    return image


#: The public name (``densekit.data.read_image``) of :func:`decode_file`: uint8 RGB in the frame EXIF orientation
#: declares (``exif=False``: the stored frame), FileNotFoundError / OSError naming the file.
read_image = decode_file
