"""A deterministic synthetic shapes dataset in COCO layout, for end-to-end tests and quick training runs.

Five classes of saturated, flat-coloured shapes on muted, textured backgrounds: colour and shape both identify the
class, so a small detector learns it in minutes on a CPU. Category ids are deliberately non-contiguous and
unsorted-looking (3, 7, 12, 25, 40) to exercise the id <-> label mapping the way COCO's 1-90 ids do.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..checkpoint.io import atomic_write

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the drawing changes, so existing copies are regenerated

# (category id, name, RGB colour)
SHAPES: list[tuple[int, str, tuple[int, int, int]]] = [
    (3, "circle", (225, 40, 40)),
    (7, "square", (40, 200, 60)),
    (12, "triangle", (45, 85, 235)),
    (25, "cross", (240, 205, 30)),
    (40, "ring", (205, 50, 215)),
]
MIN_SIDE, MAX_SIDE = 160, 320  # image side range, in pixels
MIN_OBJECT = 12  # smallest object side, in pixels
MAX_OVERLAP = 0.1  # max intersection as a fraction of the smaller of two boxes
SPLITS = ("train", "val")


def synthetic_coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(image_dir, ann_file)`` of a split written by :func:`ensure_synthetic_coco`."""
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; expected one of {SPLITS}")
    root = Path(root)
    return root / split, root / "annotations" / f"instances_{split}.json"


def _shape_mask(kind: str, h: int, w: int) -> np.ndarray:
    """Boolean ``[h, w]`` mask of a shape filling an ``h x w`` box, evaluated at pixel centres."""
    y = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h * 2 - 1  # [-1, 1] across the box
    x = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w * 2 - 1
    if kind == "circle":
        return x**2 + y**2 <= 1.0
    if kind == "square":
        return np.ones((h, w), dtype=bool)
    if kind == "triangle":  # apex up, base along the bottom edge
        return np.abs(x) <= (y + 1) / 2
    if kind == "cross":
        return (np.abs(x) <= 0.3) | (np.abs(y) <= 0.3)
    if kind == "ring":
        r2 = x**2 + y**2
        return (r2 <= 1.0) & (r2 >= 0.45**2)
    raise ValueError(kind)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Muted low-frequency texture plus a few dull lines, as float32 RGB."""
    base = rng.uniform(70, 185) + rng.normal(0, 10, 3)
    # Mostly brightness texture with a little colour, so no background patch looks like a saturated shape.
    blobs = rng.normal(0, 1, (h // 24 + 2, w // 24 + 2, 3)).astype(np.float32)
    blobs = blobs[..., :1] + 0.3 * blobs
    image = base + cv2.resize(blobs, (w, h), interpolation=cv2.INTER_CUBIC) * rng.uniform(8, 22)
    for _ in range(int(rng.integers(0, 4))):
        p1 = tuple(int(v) for v in rng.integers(0, (w, h)))
        p2 = tuple(int(v) for v in rng.integers(0, (w, h)))
        grey = float(np.clip(base.mean() + rng.uniform(-45, 45), 0, 255))
        cv2.line(image, p1, p2, (grey, grey, grey), int(rng.integers(1, 3)), cv2.LINE_AA)
    return image


def _sample_side(rng: np.random.Generator, max_side: float) -> float:
    # Mostly medium and large objects, with a minority of small ones, so a few minutes of training can fit it.
    if rng.random() < 0.15:
        return rng.uniform(MIN_OBJECT, min(2 * MIN_OBJECT, max_side))
    lo = min(2 * MIN_OBJECT, max_side)
    return float(np.exp(rng.uniform(np.log(lo), np.log(max_side))))


def _draw_image(rng: np.random.Generator, empty: bool) -> tuple[np.ndarray, list[tuple[int, list[float], int]]]:
    """One RGB uint8 image and its objects as ``(category id, [x, y, w, h], pixel area)``."""
    h, w = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    image = _background(rng, h, w)
    placed = np.zeros((0, 4))  # xyxy of objects drawn so far
    objects = []
    for _ in range(0 if empty else int(rng.integers(1, 7))):
        cls = int(rng.integers(len(SHAPES)))
        cat_id, kind, colour = SHAPES[cls]
        side = _sample_side(rng, min(h, w) / 2)
        aspect = rng.uniform(0.75, 1.33)
        bw, bh = max(MIN_OBJECT, round(side * np.sqrt(aspect))), max(MIN_OBJECT, round(side / np.sqrt(aspect)))
        bw, bh = min(bw, w), min(bh, h)
        for _attempt in range(20):  # rejection sampling against heavy occlusion
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            box = np.array([x0, y0, x0 + bw, y0 + bh], dtype=np.float64)
            inter_wh = (np.minimum(placed[:, 2:], box[2:]) - np.maximum(placed[:, :2], box[:2])).clip(min=0)
            smaller = np.minimum((placed[:, 2:] - placed[:, :2]).prod(1), bw * bh)
            if (inter_wh.prod(1) <= MAX_OVERLAP * smaller).all():
                break
        else:
            continue
        mask = _shape_mask(kind, bh, bw)
        rgb = np.clip(np.asarray(colour) + rng.normal(0, 10, 3), 0, 255)
        image[y0 : y0 + bh, x0 : x0 + bw][mask] = rgb
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        tight = [x0 + cols[0], y0 + rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
        placed = np.concatenate([placed, box[None]])
        objects.append((cat_id, [float(v) for v in tight], int(mask.sum())))
    image += rng.normal(0, 6, image.shape).astype(np.float32)  # sensor-like noise over shapes and background
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _info(split: str, num_images: int, seed: int) -> dict[str, Any]:
    return {
        "description": "densekit synthetic shapes",
        "version": GENERATOR_VERSION,
        "split": split,
        "num_images": num_images,
        "seed": seed,
    }


def _is_complete(root: Path, split: str, info: dict[str, Any]) -> bool:
    image_dir, ann_file = synthetic_coco_paths(root, split)
    try:
        data = json.loads(ann_file.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or data.get("info") != info:
        return False
    return all((image_dir / im["file_name"]).is_file() for im in data.get("images", []))


def _generate_split(root: Path, split: str, num_images: int, seed: int) -> None:
    image_dir, ann_file = synthetic_coco_paths(root, split)
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        # One generator per image, keyed by (seed, split, index): each image is independent of the others.
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        image, objects = _draw_image(rng, empty=i % 25 == 7)
        name = f"{i:06d}.jpg"
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:  # pragma: no cover
            raise OSError(f"could not encode {image_dir / name}")
        # Atomic: readers (or a second process generating the same data) never see a torn file.
        with atomic_write(image_dir / name) as f:
            f.write(encoded.tobytes())
        images.append({"id": i + 1, "file_name": name, "height": image.shape[0], "width": image.shape[1]})
        for cat_id, bbox, area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cat_id,
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    listed = {im["file_name"] for im in images}
    for stale in image_dir.glob("*.jpg"):  # left over from a larger earlier run
        if stale.name not in listed:
            stale.unlink(missing_ok=True)
    data = {
        "info": _info(split, num_images, seed),
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": n, "supercategory": "shape"} for c, n, _ in SHAPES],
    }
    # The json goes last: its presence (with matching info) is what marks the split complete.
    with atomic_write(ann_file, "w") as f:
        json.dump(data, f)


def ensure_synthetic_coco(root: str | Path, num_train: int = 400, num_val: int = 50, seed: int = 0) -> Path:
    """Generate the synthetic dataset under ``root`` unless a complete copy with the same settings is there.

    Layout: ``root/{train,val}/*.jpg`` and ``root/annotations/instances_{train,val}.json`` (see
    :func:`synthetic_coco_paths`). The output depends only on the arguments (per-image generators), and a split
    that is missing, incomplete or made with other settings is regenerated.

    Args:
        root: Output folder.
        num_train: Training images.
        num_val: Validation images.
        seed: Seed of the generator.

    Returns:
        ``root``.
    """
    root = Path(root)
    for split, n in zip(SPLITS, (num_train, num_val)):
        if _is_complete(root, split, _info(split, n, seed)):
            continue
        log.info("generating %d synthetic %s images under %s", n, split, root)
        _generate_split(root, split, n, seed)
    return root
