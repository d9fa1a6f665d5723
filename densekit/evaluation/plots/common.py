"""What the plots share: figures drawn off-screen on matplotlib's Agg canvas (no pyplot, so no global backend state
and nothing that needs a display), written atomically, and the two chart kinds both tasks draw (a labelled matrix
and grouped bars per class).

matplotlib is imported only when a figure is drawn: the numbers the plots show are computed without it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...checkpoint.io import atomic_write

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: The folder the plots go to, under an evaluation's (or a training run's) output directory.
PLOTS_DIR = "plots"

#: Up to this many classes, a matrix cell shows its count and a curve gets a legend entry.
MAX_LABELLED_CLASSES = 30


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches on an Agg canvas, laid out by matplotlib's constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: Path, dpi: int = 100) -> Path:
    """Write ``figure`` as a PNG at ``path`` (atomically; parent folders created) and return the path."""
    with atomic_write(path) as f:
        figure.savefig(f, format="png", dpi=dpi)
    return path


def matrix_size(n: int) -> float:
    """Figure side in inches for an ``n`` x ``n`` matrix: readable from 2 classes to COCO's 80."""
    return float(min(max(4.0 + 0.35 * n, 5.0), 30.0))


def draw_matrix(
    ax: Axes,
    colours: np.ndarray,
    text: np.ndarray | None,
    row_names: Sequence[str],
    col_names: Sequence[str],
    labels: tuple[str, str],
) -> None:
    """A heat map of ``colours`` (values in [0, 1]) with ``text[i, j]`` written in each cell (when given and the
    matrix is small enough to read) and the class names on both axes; ``labels`` = (y label, x label)."""
    image = ax.imshow(colours, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, shrink=0.8)
    n_rows, n_cols = colours.shape
    small = max(n_rows, n_cols) <= MAX_LABELLED_CLASSES
    if text is not None and small:
        for i in range(n_rows):
            for j in range(n_cols):
                if text[i, j]:
                    dark = colours[i, j] > 0.55
                    ax.text(j, i, text[i, j], ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
    fontsize = 8 if small else 5
    ax.set_xticks(range(n_cols), list(col_names), rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n_rows), list(row_names), fontsize=fontsize)
    ax.set_ylabel(labels[0])
    ax.set_xlabel(labels[1])


def draw_class_bars(ax: Axes, names: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str) -> None:
    """Grouped bars: one group per class, one bar per entry of ``series`` (NaN bars left out), y from 0 to 1."""
    x = np.arange(len(names))
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        heights = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=label)
    ax.set_xticks(x, list(names), rotation=90, fontsize=8 if len(names) <= MAX_LABELLED_CLASSES else 5)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(loc="upper right", fontsize=8)


def bar_width(n_classes: int) -> float:
    """Figure width in inches for a bar chart of ``n_classes`` classes."""
    return float(min(max(6.0, 0.3 * n_classes + 2.0), 30.0))
