"""Image decoding for the datasets: OpenCV (default), torchvision.io (libjpeg-turbo) or PIL, same pixels.

``data.decoder`` picks one; ``benchmarks/train_benchmark.py bench.decoders=[...]`` times them through the full train
transform on COCO-sized JPEGs (docs/benchmarks.md). All three return ``uint8`` RGB ``[H, W, 3]`` in the stored pixel
frame: EXIF orientation is ignored on purpose, as COCO boxes are in the stored frame (as PIL loads it).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

__all__ = ["DECODERS", "check_decoder", "decode_file"]


def _opencv(path: Path) -> np.ndarray | None:
    data = np.fromfile(path, dtype=np.uint8)  # not cv2.imread, which cannot tell "missing" from "corrupt"
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _torchvision(path: Path) -> np.ndarray | None:
    import torchvision.io as tio

    try:
        image = tio.decode_image(tio.read_file(str(path)), mode=tio.ImageReadMode.RGB, apply_exif_orientation=False)
    except RuntimeError:
        return None
    return image.permute(1, 2, 0).numpy()


def _pil(path: Path) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError):
        return None


#: ``data.decoder`` name -> function returning RGB uint8 or None when the file cannot be decoded.
DECODERS: dict[str, Callable[[Path], np.ndarray | None]] = {"opencv": _opencv, "torchvision": _torchvision, "pil": _pil}


def check_decoder(decoder: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``decoder`` is a key of :data:`DECODERS`."""
    if decoder not in DECODERS:
        raise ValueError(f"data.decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")


def decode_file(path: str | Path, decoder: str = "opencv") -> np.ndarray:
    """Decode an image file to ``uint8`` RGB ``[H, W, 3]`` with ``decoder`` (a key of :data:`DECODERS`).

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
    image = DECODERS[decoder](path)
    if image is None:
        raise OSError(f"cannot decode image file {path} ({path.stat().st_size} bytes) with {decoder}: not a readable image")
    return image
