"""Result files written so that a reader (or a crash) never sees half of one."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def atomic_save_json(obj: Any, path: Path) -> None:
    """Write JSON through a temp file + rename, like checkpoints, so readers never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    tmp.replace(path)
