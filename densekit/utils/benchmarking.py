"""Timing helpers shared by the benchmark tools: synchronised, interleaved wall-clock timing and its statistics."""
from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .files import atomic_save_json


def device_description(device: torch.device) -> str:
    """Human-readable hardware name: the GPU's, or the CPU model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work: timings must include the kernels, not their launch."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


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


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, iters: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Call every function ``warmup`` times, then ``iters`` times in turn; returns each one's wall times (s)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        sync()
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(iters):
        for key, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - start)
    return times


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 1.0) -> float:
    """The machine's practical compute ceiling: the best GFLOP/s of square ``size`` matmuls over about ``seconds``.

    Convolutions lower to the same GEMM kernels (oneDNN / cuBLAS), so a network's achieved GFLOP/s over this figure
    says how much of the hardware it uses.
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = synchronizer(device)
    torch.mm(a, b)  # warm-up: library initialisation, kernel selection
    sync()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def save_result(result: dict, output: str | Path | None) -> Path | None:
    """Write a benchmark tool's ``result`` as JSON to ``output`` (atomically, parents created); None: nothing."""
    if not output:
        return None
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(result, path)
    return path
