"""The charts and the sample mosaic of an inspection report (matplotlib without pyplot, Agg; OpenCV)."""
from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ...checkpoint.io import atomic_write

#: Side of a tile of the sample mosaic, in pixels.
TILE = 256


def _save_figure(fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())


def _figure(width: float = 7.0, height: float = 4.0) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # late: only the report draws; no pyplot, no global backend state

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def bar_chart(path: Path, names: Sequence[str], series: dict[str, Sequence[float]], title: str, xlabel: str,
              log: bool = False) -> None:
    """Horizontal bars, one group per name, one bar per series."""
    fig, ax = _figure(7.0, max(3.0, 0.3 * len(names) * max(1, len(series)) + 1.6))
    y = np.arange(len(names))
    height = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        ax.barh(y + i * height, values, height, label=label)
    ax.set_yticks(y + height * (len(series) - 1) / 2, list(names))
    ax.invert_yaxis()
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in series.values()])
    positive = values[values > 0]
    if log and len(positive) and positive.max() > 50 * positive.min():  # linear unless the counts span decades
        ax.set_xscale("symlog")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if len(series) > 1:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(series), frameon=False)
    _save_figure(fig, path)


def histogram(path: Path, values: np.ndarray, bins: Any, title: str, xlabel: str, marks: Sequence[float] = (),
              mark_label: str = "", log_x: bool = False) -> None:
    """A histogram of ``values``, with dashed vertical lines at ``marks`` (e.g. the anchor sizes)."""
    fig, ax = _figure()
    ax.hist(values, bins=bins, color="#4477aa")
    for i, mark in enumerate(marks):
        ax.axvline(mark, color="#cc3311", linestyle="--", linewidth=1, label=mark_label if i == 0 else None)
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if marks and mark_label:
        ax.legend()
    _save_figure(fig, path)


def fit_tile(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    scale = size / max(image.shape[:2])
    h, w = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR), scale


def mosaic(tiles: Sequence[tuple[np.ndarray, str]], path: Path) -> None:
    """BGR tiles (at most :data:`TILE` a side) in a near-square grid, each captioned, written as a JPEG."""
    cols = max(1, math.ceil(math.sqrt(len(tiles))))
    rows = max(1, math.ceil(len(tiles) / cols))
    canvas = np.full((rows * TILE, cols * TILE, 3), 32, np.uint8)
    for i, (tile, caption) in enumerate(tiles):
        y, x = (i // cols) * TILE, (i % cols) * TILE
        canvas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
        for color, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):
            cv2.putText(canvas, caption[-40:], (x + 3, y + TILE - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, thickness,
                        cv2.LINE_AA)
    ok, encoded = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:  # pragma: no cover
        raise OSError(f"could not encode {path}")
    with atomic_write(path) as f:
        f.write(encoded.tobytes())


def sample_mosaic(indices: Iterable[int], draw: Callable[[int], tuple[np.ndarray, str] | None], path: Path) -> None:
    """``path``: the mosaic of ``draw(i)`` for each of ``indices`` (a BGR tile of at most :data:`TILE` a side and
    its caption; ``None`` for an image that cannot be read, which the report already lists)."""
    mosaic([tile for i in indices if (tile := draw(i)) is not None], path)
