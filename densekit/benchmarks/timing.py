"""The one way densekit's benchmarks time code: warm-up, then the timed functions interleaved, each call
device-synchronised.

Also what a timing needs beside it: the hardware's name, the device's matmul peak (the ceiling to put a network's
achieved GFLOP/s against) and the summary statistics of a list of wall times.
"""
from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    """Human-readable hardware name: the GPU's, or the CPU model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work: timings must include the kernels, not their launch."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    warmup: int,
    iters: int,
    sync: Callable[[], None],
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Wall times (s) of ``iters`` calls of every function, taken in turn, after ``warmup`` untimed calls of each.

    Within each iteration every function runs once, in ``fns``' order, so that a slow period of a shared machine
    hits all of them alike instead of whichever happened to run then. ``sync`` (see :func:`synchronizer`) runs
    before each timed call, so no earlier work is billed to it, and after it, so that its own queued kernels are.

    Args:
        fns: Name -> function to time (its result is discarded).
        warmup: Untimed calls of each function first (allocator, kernel selection, compilation).
        iters: Timed calls of each function.
        sync: Waits for the device's queued work.
        clock: Seconds from a monotonic clock; tests pass a fake one.

    Returns:
        Name -> ``iters`` wall times in seconds, in call order.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        sync()
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(iters):
        for key, fn in fns.items():
            sync()
            start = clock()
            fn()
            sync()
            times[key].append(clock() - start)
    return times


def stats(times_s: list[float], batch: int) -> dict[str, float]:
    """mean / median / p90 in milliseconds, and images per second from the mean."""
    ms = sorted(t * 1000.0 for t in times_s)
    rank = 0.9 * (len(ms) - 1)  # p90 by linear interpolation between the closest ranks
    lo, hi = math.floor(rank), math.ceil(rank)
    mean = statistics.fmean(ms)
    return {
        "mean_ms": mean,
        "median_ms": statistics.median(ms),
        "p90_ms": ms[lo] + (ms[hi] - ms[lo]) * (rank - lo),
        "fps": batch * 1000.0 / mean,
    }


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 1.0) -> float:
    """The machine's practical compute ceiling: the best GFLOP/s of square ``size`` matmuls over about ``seconds``.

    Convolutions lower to the same GEMM kernels (oneDNN / cuBLAS), so a network's achieved GFLOP/s over this figure
    says how much of the hardware it uses.
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = synchronizer(device)
    matmul = {"mm": lambda: torch.mm(a, b)}
    # One warm-up call (library initialisation, kernel selection), then one timed call to size the run to ``seconds``.
    probe = time_interleaved(matmul, warmup=1, iters=1, sync=sync)["mm"]
    times = time_interleaved(matmul, warmup=0, iters=max(1, math.ceil(seconds / max(probe[0], 1e-9))), sync=sync)["mm"]
    return 2 * size**3 / min(probe + times) / 1e9
