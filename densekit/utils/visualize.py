"""Drawing predictions on images (cv2): detection boxes with captions, tracks' trails and segmentation colour
overlays, for `eval.visualize=N` and tools/predict.py."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from ..checkpoint.io import atomic_write


def _color(label: int) -> tuple[int, int, int]:
    # Fixed, well-separated hues per class so the same class keeps its colour across images: golden-ratio steps
    # around the hue circle keep any run of consecutive labels apart (a fixed step brings label k back near 0).
    hue = int((label * 0.618033988749895) % 1.0 * 180)
    bgr = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def draw_detections(
    image_rgb: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    score_threshold: float = 0.3,
    track_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Return a BGR copy of ``image_rgb`` with boxes (xyxy, image pixels) and "name score" captions, "#7 name score"
    for a box with a track id (``track_ids``: one per box, -1 for none)."""
    canvas = cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2BGR)
    ids = np.full(len(labels), -1) if track_ids is None else track_ids
    for box, score, label, track_id in zip(boxes, scores, labels, ids):
        if score < score_threshold:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        color = _color(int(label))
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, 2)
        name = class_names[int(label)] if int(label) < len(class_names) else str(int(label))
        caption = f"#{int(track_id)} {name} {score:.2f}" if track_id >= 0 else f"{name} {score:.2f}"
        (tw, th), _ = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        cv2.rectangle(canvas, (x1, max(0, y1 - th - 4)), (x1 + tw + 2, max(th + 4, y1)), color, -1)
        cv2.putText(canvas, caption, (x1 + 1, max(th + 1, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def draw_trails(canvas_bgr: np.ndarray, trails: Mapping[int, np.ndarray], thickness: int = 2) -> np.ndarray:
    """Draw each track's recent box centres (``{track id: float [K, 2] xy image pixels, oldest first}``) onto
    ``canvas_bgr`` as a polyline in the track's colour, ending in a dot at its current centre; returns the canvas.

    Colours follow the track id (not the class, as the boxes do), so that two objects of one class are told apart.
    """
    for track_id, centres in trails.items():
        if len(centres) == 0:
            continue
        points = np.round(np.asarray(centres, dtype=np.float64)).astype(np.int32).reshape(-1, 1, 2)
        color = _color(int(track_id))
        if len(points) > 1:
            cv2.polylines(canvas_bgr, [points], isClosed=False, color=color, thickness=thickness, lineType=cv2.LINE_AA)
        cv2.circle(canvas_bgr, tuple(int(v) for v in points[-1, 0]), thickness + 1, color, -1, cv2.LINE_AA)
    return canvas_bgr


def overlay_segmentation(
    image_rgb: np.ndarray,
    label_map: np.ndarray,
    class_names: Sequence[str],
    alpha: float = 0.5,
    ignore_index: int | None = 255,
) -> np.ndarray:
    """Return a BGR copy of ``image_rgb`` with each class's pixels tinted in its colour and a legend of the classes
    present (largest first).

    The colours are those :func:`draw_detections` gives the same label, so they hold for any class count (the
    Cityscapes palette of :func:`densekit.evaluation.cityscapes.colorize` covers its 19 trainIds only). Pixels equal
    to ``ignore_index`` keep the photo's colours.

    Args:
        image_rgb: ``uint8 [H, W, 3]`` RGB.
        label_map: ``[H, W]`` integer class per pixel, the image's size.
        class_names: Name of each label, for the legend.
        alpha: Weight of the class colour.
        ignore_index: Label left untinted (``None``: none).
    """
    if label_map.shape != image_rgb.shape[:2]:
        raise ValueError(f"label map is {list(label_map.shape)} but the image is {list(image_rgb.shape[:2])}")
    canvas = cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2BGR)
    labels, counts = np.unique(label_map, return_counts=True)
    keep = labels != ignore_index if ignore_index is not None else np.ones(len(labels), dtype=bool)
    labels, counts = labels[keep], counts[keep]
    palette = np.array([_color(i) for i in range(int(label_map.max(initial=0)) + 1)], dtype=np.uint8)
    colors = palette[np.clip(label_map, 0, None)]  # one lookup, however many classes
    tinted = label_map != ignore_index if ignore_index is not None else np.ones(label_map.shape, dtype=bool)
    canvas[tinted] = cv2.addWeighted(canvas, 1.0 - alpha, colors, alpha, 0.0)[tinted]
    rows = max(0, (canvas.shape[0] - 4) // 16)  # as many legend rows as the image has room for
    for row, label in enumerate(labels[np.argsort(-counts)][:rows]):
        name = class_names[int(label)] if 0 <= int(label) < len(class_names) else str(int(label))
        y = 4 + row * 16
        cv2.rectangle(canvas, (4, y), (16, y + 12), _color(int(label)), -1)
        for color, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):  # outlined: readable on any photo
            cv2.putText(canvas, name, (20, y + 11), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, thickness, cv2.LINE_AA)
    return canvas


def save_image(path: str | Path, image_bgr: np.ndarray) -> None:
    """Encode ``image_bgr`` in the format of ``path``'s suffix (``.jpg``, ``.png``...) and write it atomically."""
    path = Path(path)
    ok, encoded = cv2.imencode(path.suffix, image_bgr)
    if not ok:
        raise OSError(f"could not encode an image for {path}")
    with atomic_write(path) as f:
        f.write(encoded.tobytes())
