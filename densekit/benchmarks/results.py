"""Where a benchmark tool's result goes: a JSON file that a reader (or a crash) never sees half of."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import to_absolute_path

from densekit.utils.files import atomic_save_json


def save_result(result: dict[str, Any], output: str | Path | None) -> Path | None:
    """Write a benchmark tool's ``result`` as JSON to ``output`` (atomically, parents created); None: nothing."""
    if not output:
        return None
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(result, path)
    return path


def publish(result: dict[str, Any], report: str, output: str | None) -> None:
    """Print a tool's ``report`` of ``result``, then save ``result`` to ``output`` (relative to where the tool was
    started) if one is given, and say where."""
    print(report)
    path = save_result(result, to_absolute_path(str(output)) if output else None)
    if path is not None:
        print(f"\nwrote {path}")
