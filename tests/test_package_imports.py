"""The installed package stands alone: importing every densekit module imports neither effdet (a dev-only extra)
nor benchmarks/ (which sits beside the package and is not installed)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: the test session itself has imported effdet through other tests.
CHECK = """
import importlib, importlib.util, pkgutil, sys
import densekit
names = [m.name for m in pkgutil.walk_packages(densekit.__path__, "densekit.")]
for name in names:
    importlib.import_module(name)
assert densekit.__file__.startswith(sys.argv[1]), densekit.__file__
assert "effdet" not in sys.modules, sorted(m for m in sys.modules if m.startswith("effdet"))
assert not any(m == "benchmarks" or m.startswith("benchmarks.") for m in sys.modules)
for gone in ("densekit.utils.reference_models", "densekit.utils.benchmarking"):
    assert importlib.util.find_spec(gone) is None, gone
print(len(names), "modules")
"""


def test_importing_every_densekit_module_imports_neither_effdet_nor_benchmarks() -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))  # this checkout's densekit
    done = subprocess.run([sys.executable, "-c", CHECK, str(ROOT)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[0]) > 20  # the walk found the subpackages' modules, not just the top level
