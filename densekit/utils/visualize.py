"""Drawing detections on images (cv2), for `eval.visualize=N`."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ..checkpoint.io import atomic_write


def _color(label: int) -> tuple[int, int, int]:
    # Fixed, well-separated hues per class so the same class keeps its colour across images.
    hue = (label * 47) % 180
    bgr = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def draw_detections(
    image_rgb: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    score_threshold: float = 0.3,
) -> np.ndarray:
    """Return a BGR copy of ``image_rgb`` with boxes (xyxy, image pixels) and "name score" captions."""
    canvas = cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2BGR)
    for box, score, label in zip(boxes, scores, labels):
        if score < score_threshold:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        color = _color(int(label))
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, 2)
        name = class_names[int(label)] if int(label) < len(class_names) else str(int(label))
        caption = f"{name} {score:.2f}"
        (tw, th), _ = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        cv2.rectangle(canvas, (x1, max(0, y1 - th - 4)), (x1 + tw + 2, max(th + 4, y1)), color, -1)
        cv2.putText(canvas, caption, (x1 + 1, max(th + 1, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def save_image(path: str | Path, image_bgr: np.ndarray) -> None:
    """Encode ``image_bgr`` in the format of ``path``'s suffix (``.jpg``, ``.png``...) and write it atomically."""
    path = Path(path)
    ok, encoded = cv2.imencode(path.suffix, image_bgr)
    if not ok:
        raise OSError(f"could not encode an image for {path}")
    with atomic_write(path) as f:
        f.write(encoded.tobytes())
