"""The per-class score table both evaluators print: ``name value`` cells in as many columns as fit the width."""
from __future__ import annotations

from collections.abc import Mapping


def per_class_columns(values: Mapping[str, str], width: int, max_name: int, gap: int) -> list[str]:
    """Lines of ``name value`` cells laid out column-major, so classes read top to bottom in their label order.

    Args:
        values: Class name -> already formatted value (5 characters wide).
        width: Target line width.
        max_name: Names are cut to at most this many characters.
        gap: Spaces between columns.
    """
    name_w = min(max_name, max(len(n) for n in values))
    cell_w = name_w + 1 + 5
    ncols = max(1, (width + gap) // (cell_w + gap))
    nrows = -(-len(values) // ncols)
    cells = [f"{n[:name_w]:<{name_w}} {v}" for n, v in values.items()]
    return [
        (" " * gap).join(cells[c * nrows + r] for c in range(ncols) if c * nrows + r < len(cells)) for r in range(nrows)
    ]
