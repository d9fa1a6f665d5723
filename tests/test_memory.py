"""densekit.utils.memory: freed activations are reused, not page-faulted in again on every forward pass."""
import subprocess
import sys

import pytest

from densekit.utils import memory

# A forward pass's allocation pattern: activations of a few MiB, many alive at once, all freed at its end. Prints the
# minor page faults of five passes after three warm-up ones, from glibc's starting thresholds, with or without
# retain_freed_memory() applied on top.
PASSES = """
import ctypes, importlib.util, resource, sys, torch
# glibc's starting thresholds (mmap and trim at 128 KiB), pinned: its adaptive heuristic keeps them or not depending
# on the allocation history, which would make the baseline depend on the test run's layout.
libc = ctypes.CDLL("libc.so.6")
assert libc.mallopt(-3, 128 << 10) and libc.mallopt(-1, 128 << 10)
if sys.argv[1] == "retain":  # the module alone: importing the densekit package would cost seconds per process
    spec = importlib.util.spec_from_file_location("memory", sys.argv[2])
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    assert memory.retain_freed_memory() and memory.retain_freed_memory()  # in force, and idempotent
sizes = [2 << 20, 1 << 20, 512 << 10, 3 << 20] * 6  # float32 elements: 2-12 MiB each, 126 MiB in all
def forward():  # a network keeps several activations alive (skip connections, feature levels), then frees them all
    kept = [torch.ones(size) for size in sizes]
    del kept
for _ in range(3):
    forward()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    forward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PASSES, mode, memory.__file__], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_activations_are_reused_instead_of_page_faulted_again() -> None:
    default, retained = _faults("default"), _faults("retain")
    # glibc's starting thresholds return the freed activations to the kernel: 5 passes x 32k pages fault in again.
    assert default > 50_000
    assert retained < default / 4
