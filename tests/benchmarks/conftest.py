import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_script(script: str, *overrides: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``benchmarks/<script>`` with Hydra ``overrides`` from the repository root, offline; ``env`` adds variables."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, f"benchmarks/{script}", *overrides], cwd=ROOT, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def run_script():
    """``run_script(script, *overrides, env=None, timeout=300)``: see :func:`_run_script`."""
    return _run_script
