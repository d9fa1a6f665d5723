"""A deterministic synthetic street-scene dataset in the real Cityscapes layout, made with cityscapesscripts.

Each scene is written the way Cityscapes ships: ``*_gtFine_polygons.json`` annotations with real label names, from
which cityscapesscripts itself rasterises ``*_gtFine_labelIds.png`` and ``*_gtFine_instanceIds.png``
(``json2labelImg`` / ``json2instanceImg``) and, exactly as a user would, ``*_gtFine_labelTrainIds.png``
(``createTrainIdLabelImgs.main`` with ``CITYSCAPES_DATASET`` set). The image is then painted from those label maps,
so image and labels agree pixel for pixel. Scenes: sky, a skyline of buildings and trees, sidewalk, a road in
perspective, cars on the road, people on the sidewalks, plus ignored regions (unlabeled, static clutter, the ego
vehicle's bonnet). Class colours, textures and positions make it learnable by a small model in minutes on a CPU.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.helpers.labels import name2label
from cityscapesscripts.preparation import createTrainIdLabelImgs
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import json2labelImg

from ..checkpoint.io import atomic_write

log = logging.getLogger(__name__)

__all__ = ["SYNTHETIC_CITIES", "ensure_synthetic_cityscapes"]

GENERATOR_VERSION = 1  # bump when the drawing changes, so existing copies are regenerated
SPLITS = ("train", "val")
SYNTHETIC_CITIES = {"train": ("synthalpha", "synthbeta"), "val": ("synthgamma", "synthdelta")}

# Base RGB colour per label name; cars and people get a colour per instance instead.
_BASE_COLOURS = {
    "unlabeled": (0, 0, 0),
    "ego vehicle": (28, 28, 34),
    "static": (150, 115, 55),
    "road": (82, 82, 88),
    "sidewalk": (188, 176, 166),
    "building": (128, 108, 96),
    "vegetation": (62, 128, 40),
    "sky": (128, 178, 232),
}
_CAR_PALETTE = np.array(
    [(205, 32, 30), (32, 62, 196), (226, 192, 28), (232, 232, 236), (22, 150, 132), (232, 118, 20)], np.float32
)
_CLOTHES_PALETTE = np.array([(40, 40, 120), (150, 30, 40), (30, 110, 60), (90, 60, 130), (200, 120, 40)], np.float32)
_SKIN = np.array((205, 160, 128), np.float32)


def _split_paths(root: Path, split: str, city: str, name: str) -> dict[str, Path]:
    gt = root / "gtFine" / split / city
    return {
        "image": root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png",
        "polygons": gt / f"{name}_gtFine_polygons.json",
        "labelIds": gt / f"{name}_gtFine_labelIds.png",
        "instanceIds": gt / f"{name}_gtFine_instanceIds.png",
        "labelTrainIds": gt / f"{name}_gtFine_labelTrainIds.png",
    }


def _names(split: str, num_images: int) -> list[tuple[str, str]]:
    """``(city, name)`` per image, named like Cityscapes' ``<city>_<sequence>_<frame>``."""
    cities = SYNTHETIC_CITIES[split]
    return [(cities[i % len(cities)], f"{cities[i % len(cities)]}_{i:06d}_000019") for i in range(num_images)]


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _blob(cx: float, cy: float, r: float, rng: np.random.Generator, n: int = 14) -> list[tuple[float, float]]:
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radii = r * rng.uniform(0.8, 1.15, n)
    return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))


def _scene(rng: np.random.Generator, h: int, w: int) -> list[tuple[str, list[tuple[float, float]]]]:
    """``(label name, polygon)`` objects, back to front (later ones are drawn over earlier ones, as in gtFine)."""
    objects: list[tuple[str, list[tuple[float, float]]]] = []
    hz = rng.uniform(0.38, 0.5) * h  # horizon
    objects.append(("sky", _rect(0, 0, w, hz)))
    x = -rng.uniform(0, 0.1) * w
    while x < w:  # skyline: buildings, trees, and gaps showing the sky
        bw, kind = rng.uniform(0.1, 0.3) * w, rng.random()
        if kind < 0.6:
            objects.append(("building", _rect(x, rng.uniform(0.03 * h, hz - 0.12 * h), x + bw, hz + 2)))
        elif kind < 0.85:
            r = rng.uniform(0.07, 0.14) * h
            objects.append(("vegetation", _blob(x + bw / 2, hz - r * rng.uniform(0.4, 0.9), r, rng)))
        x += bw
    # The sidewalk fills the ground; the road is drawn over it as a trapezoid from near the vanishing point, so
    # sidewalk remains on the sides. Points may lie outside the image, which the rasteriser clips.
    objects.append(("sidewalk", _rect(0, hz, w, h)))
    vx, tw = rng.uniform(0.35, 0.65) * w, rng.uniform(0.03, 0.08) * w
    bl, br = rng.uniform(-0.25, 0.12) * w, rng.uniform(0.88, 1.25) * w
    objects.append(("road", [(vx - tw, hz), (vx + tw, hz), (br, h), (bl, h)]))

    def road_edges(y: float) -> tuple[float, float]:
        t = (y - hz) / (h - hz)
        return vx - tw + t * (bl - vx + tw), vx + tw + t * (br - vx - tw)

    def roadside_x(y: float, half: float) -> float | None:
        left, right = road_edges(y)
        sides = [(half, left - half), (right + half, w - half)]
        sides = [(a, b) for a, b in sides if b > a]
        if not sides:
            return None
        a, b = sides[int(rng.integers(len(sides)))]
        return float(rng.uniform(a, b))

    for _ in range(int(rng.integers(0, 3))):  # clutter on the sidewalks ("static", ignored in evaluation)
        y = rng.uniform(hz + 0.08 * h, 0.9 * h)
        s = 0.04 * h + 0.12 * h * (y - hz) / (h - hz)
        cx = roadside_x(y, s / 2)
        if cx is not None:
            objects.append(("static", _rect(cx - s / 2, y - s * 1.4, cx + s / 2, y)))
    people = []
    for _ in range(int(rng.integers(0, 5))):
        y = rng.uniform(hz + 0.06 * h, 0.92 * h)
        ph = h * (0.1 + 0.45 * (y - hz) / (h - hz))
        pw = 0.38 * ph
        cx = roadside_x(y, pw / 2)
        if cx is not None:
            people.append((y, cx, ph, pw))
    cars = []
    for _ in range(int(rng.integers(1, 5))):
        y = rng.uniform(hz + 0.1 * h, 0.97 * h)
        cw = w * (0.07 + 0.33 * (y - hz) / (h - hz))
        left, right = road_edges(y)
        lo, hi = max(left, 0.0) + cw / 2, min(right, float(w)) - cw / 2
        cars.append((y, rng.uniform(lo, hi) if hi > lo else (lo + hi) / 2, cw * 0.55, cw))
    # Nearer objects (lower foot line) are drawn later, so they occlude farther ones.
    for y, cx, oh, ow, label in sorted([(*p, "person") for p in people] + [(*c, "car") for c in cars]):
        if label == "person":
            rel = [(-0.2, 1), (0.2, 1), (0.2, 0.84), (0.5, 0.78), (0.45, 0.45), (0.38, 0), (0.06, 0), (0, 0.38),
                   (-0.06, 0), (-0.38, 0), (-0.45, 0.45), (-0.5, 0.78), (-0.2, 0.84)]  # fmt: skip
        else:
            rel = [(-0.5, 0), (0.5, 0), (0.5, 0.5), (0.3, 0.56), (0.18, 1), (-0.22, 1), (-0.32, 0.56), (-0.5, 0.5)]
        objects.append((label, [(cx + dx * ow, y - dy * oh) for dx, dy in rel]))
    if rng.random() < 0.7:  # the ego vehicle's bonnet along the bottom edge
        eh = rng.uniform(0.05, 0.1) * h
        xs = np.linspace(0, w, 9)
        bonnet = [(float(x), h - eh * (1 - 0.6 * (2 * x / w - 1) ** 2)) for x in xs]
        objects.append(("ego vehicle", bonnet + [(w, h), (0, h)]))
    return objects


def _instance_extent(instance_ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per masked pixel: its instance index (into ``np.unique``) and height within its instance (0 top, 1 bottom)."""
    rows = np.nonzero(mask)[0]
    _, inverse = np.unique(instance_ids[mask], return_inverse=True)
    top = np.full(inverse.max(initial=-1) + 1, np.iinfo(np.int64).max)
    bottom = np.full_like(top, -1)
    np.minimum.at(top, inverse, rows)
    np.maximum.at(bottom, inverse, rows)
    return inverse, (rows - top[inverse]) / np.maximum(bottom[inverse] - top[inverse], 1)


def _paint(rng: np.random.Generator, label_ids: np.ndarray, instance_ids: np.ndarray) -> np.ndarray:
    """RGB ``uint8`` image painted from the label maps: a colour and texture per class, a colour per car / person."""
    h, w = label_ids.shape
    lut = np.zeros((256, 3), np.float32)
    for name, colour in _BASE_COLOURS.items():
        lut[name2label[name].id] = np.asarray(colour) + rng.normal(0, 10, 3)
    image = lut[label_ids]
    yy, xx = np.mgrid[0:h, 0:w]
    names = ("sky", "building", "sidewalk", "vegetation", "road", "car", "person")
    is_ = {n: label_ids == name2label[n].id for n in names}
    image[is_["sky"]] += (25 * yy / h)[is_["sky"], None]  # brighter towards the horizon
    period = max(4, w // int(rng.integers(30, 50)))
    windows = is_["building"] & (xx % period < period // 2) & (yy % (period + 2) < period // 2 + 1)
    image[windows] *= 0.55
    tile = max(3, w // 40)
    image[is_["sidewalk"] & ((xx % tile == 0) | (yy % tile == 0))] -= 28
    image[is_["vegetation"]] += rng.normal(0, 28, (int(is_["vegetation"].sum()), 1))
    image[is_["road"]] += rng.normal(0, 7, (int(is_["road"].sum()), 1))
    for name, palette in (("car", _CAR_PALETTE), ("person", _CLOTHES_PALETTE)):
        mask = is_[name]
        if not mask.any():
            continue
        inverse, rel = _instance_extent(instance_ids, mask)
        n = inverse.max() + 1
        colours = palette[rng.integers(len(palette), size=n)] + rng.normal(0, 12, (n, 3))
        pixels = colours[inverse]
        if name == "car":  # dark windows on the cabin, dark wheels along the bottom
            pixels[(rel > 0.08) & (rel < 0.42)] = (45, 55, 70)
            pixels[rel > 0.86] = (20, 20, 20)
        else:
            pixels[rel < 0.16] = _SKIN
        image[mask] = pixels
    image *= rng.uniform(0.85, 1.12)  # exposure
    image += rng.normal(0, 4, image.shape).astype(np.float32)
    image = cv2.GaussianBlur(image, (3, 3), 0.6)  # soft edges, like a real lens
    return np.clip(image, 0, 255).astype(np.uint8)


def _info(split: str, num_images: int, size: tuple[int, int], seed: int) -> dict[str, Any]:
    return {
        "description": "densekit synthetic cityscapes",
        "version": GENERATOR_VERSION,
        "split": split,
        "num_images": num_images,
        "size": list(size),
        "seed": seed,
    }


def _marker(root: Path, split: str) -> Path:
    return root / f".densekit_synthetic_{split}.json"


def _is_complete(root: Path, split: str, info: dict[str, Any]) -> bool:
    try:
        marker = json.loads(_marker(root, split).read_text())
    except (OSError, ValueError):
        return False
    if marker != info:
        return False
    return all(
        p.is_file()
        for city, name in _names(split, info["num_images"])
        for p in _split_paths(root, split, city, name).values()
    )


def _instance_image(polygons: Path) -> np.ndarray:
    """cityscapesscripts' instanceIds raster (``uint16``, ``labelId * 1000 + k`` per instance) of a polygons file.

    Its ``json2instanceImg`` cannot save: it writes a 32-bit PIL image as PNG, which current Pillow refuses; the
    official files are 16-bit PNGs, so the raster is converted and saved here.
    """
    annotation = Annotation()
    annotation.fromJsonFile(str(polygons))
    raster = np.asarray(createInstanceImage(annotation, "ids"))
    return raster.astype(np.uint16)


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _generate_split(root: Path, split: str, num_images: int, size: tuple[int, int], seed: int) -> None:
    h, w = size
    # Everything is made in a private staging root and published file by file (atomic writes), so readers and
    # concurrent generators never see a half-written file; cityscapesscripts' converter, which globs its whole
    # CITYSCAPES_DATASET, then converts exactly this split.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        for i, (city, name) in enumerate(_names(split, num_images)):
            rng = np.random.default_rng([seed, SPLITS.index(split), i])  # per image: independent of the others
            paths = _split_paths(staging, split, city, name)
            for p in paths.values():
                p.parent.mkdir(parents=True, exist_ok=True)
            polygons = {
                "imgHeight": h,
                "imgWidth": w,
                "objects": [
                    {"label": label, "polygon": [[round(x), round(y)] for x, y in poly]}
                    for label, poly in _scene(rng, h, w)
                ],
            }
            paths["polygons"].write_text(json.dumps(polygons))
            json2labelImg(str(paths["polygons"]), str(paths["labelIds"]), "ids")
            instance_ids = _instance_image(paths["polygons"])
            if not cv2.imwrite(str(paths["instanceIds"]), instance_ids):  # pragma: no cover
                raise OSError(f"could not write {paths['instanceIds']}")
            label_ids = cv2.imread(str(paths["labelIds"]), cv2.IMREAD_UNCHANGED)
            image = _paint(rng, label_ids, instance_ids)
            if not cv2.imwrite(str(paths["image"]), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):  # pragma: no cover
                raise OSError(f"could not write {paths['image']}")
        if num_images:
            with _environ("CITYSCAPES_DATASET", str(staging)), contextlib.redirect_stdout(io.StringIO()):
                createTrainIdLabelImgs.main()  # prints progress; the result is checked by _is_complete
        staged = {p.relative_to(staging) for p in staging.rglob("*") if p.is_file()}
        for rel in sorted(staged):
            # Published through atomic_write (unique temp name, fsync, rename) like every file densekit writes; the
            # staging copy exists because cityscapesscripts writes its label images in place, by path.
            with open(staging / rel, "rb") as src, atomic_write(root / rel) as dst:
                shutil.copyfileobj(src, dst)
        # Remove leftovers of an earlier, larger run, only in this generator's own cities.
        for top in ("leftImg8bit", "gtFine"):
            for city in SYNTHETIC_CITIES[split]:
                for p in (root / top / split / city).glob("*"):
                    if p.is_file() and p.relative_to(root) not in staged:
                        p.unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # The marker goes last: its presence (with matching settings) is what marks the split complete.
    with atomic_write(_marker(root, split), "w") as f:
        json.dump(_info(split, num_images, size, seed), f)


def ensure_synthetic_cityscapes(
    root: str | Path,
    num_train: int = 200,
    num_val: int = 40,
    size: tuple[int, int] = (128, 256),
    seed: int = 0,
) -> Path:
    """Generate the synthetic Cityscapes under ``root`` unless a complete copy with the same settings is there.

    Layout (real Cityscapes): ``root/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png`` and
    ``root/gtFine/{train,val}/<city>/<name>_gtFine_{polygons.json,labelIds.png,instanceIds.png,labelTrainIds.png}``,
    usable by :class:`CityscapesSegmentation` and by cityscapesscripts' own evaluation. The output depends only on
    the arguments; a split that is missing, incomplete or made with other settings is regenerated.

    Args:
        root: Output folder (the ``cityscapes`` root).
        num_train: Training images.
        num_val: Validation images.
        size: Image ``(height, width)``.
        seed: Seed of the generator.

    Returns:
        ``root``.
    """
    root = Path(root)
    h, w = size
    if h < 16 or w < 16:
        raise ValueError(f"size must be at least 16x16, got {size}")
    root.mkdir(parents=True, exist_ok=True)
    for split, n in zip(SPLITS, (num_train, num_val)):
        if n < 0:
            raise ValueError(f"number of {split} images must be >= 0, got {n}")
        info = _info(split, n, (h, w), seed)
        if _is_complete(root, split, info):
            continue
        log.info("generating %d synthetic Cityscapes %s images (%dx%d) under %s", n, split, h, w, root)
        _generate_split(root, split, n, (h, w), seed)
    return root
