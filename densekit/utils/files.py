"""Result files written so that a reader (or a crash) never sees half of one."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..checkpoint.io import atomic_write


def atomic_save_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON through :func:`~densekit.checkpoint.io.atomic_write` (numbers that are not
    Python floats, e.g. numpy scalars, are written as floats).

    Raises:
        OSError: the disk is full (or a quota reached); the message names ``path`` and the space left, and the
            previous file is unchanged (see :func:`~densekit.checkpoint.io.atomic_write`).
    """
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, default=float)
