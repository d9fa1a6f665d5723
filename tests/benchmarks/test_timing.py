"""benchmarks/timing.py: the order of warm-up, synchronisation and interleaved timed calls, checked with a fake
clock and recorded calls, the statistics, and that the other timings of benchmarks/ go through time_interleaved."""
from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

from densekit.benchmarks import timing
from densekit.benchmarks.timing import stats, time_interleaved


class FakeMachine:
    """Records every call, sync and clock read; each timed function advances the clock by its own cost."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.now = 0.0

    def clock(self) -> float:
        self.events.append("clock")
        return self.now

    def sync(self) -> None:
        self.events.append("sync")

    def fn(self, name: str, cost_s: float) -> Callable[[], None]:
        def call() -> None:
            self.events.append(name)
            self.now += cost_s

        return call


def test_warm_up_then_calls_in_turn_each_between_syncs() -> None:
    machine = FakeMachine()
    fns = {"a": machine.fn("a", 0.001), "b": machine.fn("b", 0.004)}
    times = time_interleaved(fns, warmup=2, iters=3, sync=machine.sync, clock=machine.clock)
    warm_up = ["a", "a", "sync", "b", "b", "sync"]  # every warm-up before any timed call, the queue drained after each
    timed = ["sync", "clock", "a", "sync", "clock", "sync", "clock", "b", "sync", "clock"]  # a, b, a, b, ...
    assert machine.events == warm_up + timed * 3
    assert times["a"] == pytest.approx([0.001] * 3)
    assert times["b"] == pytest.approx([0.004] * 3)


def test_a_slow_period_hits_every_function_alike() -> None:
    """A machine that becomes 10x slower during the second iteration: interleaved, both functions see it once."""
    machine = FakeMachine()
    iteration = {"n": 0}

    def slow_down(name: str, cost_s: float) -> Callable[[], None]:
        def call() -> None:
            machine.events.append(name)
            machine.now += cost_s * (10 if iteration["n"] == 1 else 1)
            if name == "b":
                iteration["n"] += 1

        return call

    times = time_interleaved({"a": slow_down("a", 0.002), "b": slow_down("b", 0.002)}, 0, 3, machine.sync, machine.clock)
    assert times["a"] == pytest.approx([0.002, 0.02, 0.002])
    assert times["b"] == pytest.approx(times["a"])


def test_no_timed_calls_without_iterations() -> None:
    machine = FakeMachine()
    assert time_interleaved({"a": machine.fn("a", 1.0)}, 1, 0, machine.sync, machine.clock) == {"a": []}
    assert machine.events == ["a", "sync"]


def test_stats_in_milliseconds_with_an_interpolated_p90() -> None:
    s = stats([n / 1000.0 for n in range(10, 0, -1)], batch=2)  # 1..10 ms, in any order
    assert s["mean_ms"] == pytest.approx(5.5) and s["median_ms"] == pytest.approx(5.5)
    assert s["p90_ms"] == pytest.approx(9.1)  # rank 8.1 between 9 and 10 ms
    assert s["fps"] == pytest.approx(2 * 1000.0 / 5.5)


def test_matmul_peak_is_timed_through_time_interleaved(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    def recording(fns: dict, warmup: int, iters: int, sync: Callable[[], None], **kwargs: object) -> dict:
        calls.append((warmup, iters))
        return time_interleaved(fns, warmup, iters, sync, **kwargs)

    monkeypatch.setattr(timing, "time_interleaved", recording)
    assert timing.matmul_peak_gflops(torch.device("cpu"), size=64, seconds=0.01) > 0
    assert calls[0] == (1, 1) and len(calls) == 2 and calls[1][0] == 0 and calls[1][1] >= 1


def test_loader_throughput_is_timed_through_time_interleaved(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import train_benchmark

    ticks = iter([10.0, 10.5])  # the timed call's start and end: half a second
    monkeypatch.setattr(
        train_benchmark, "time_interleaved", functools.partial(time_interleaved, clock=lambda: next(ticks))
    )
    loader = [(torch.zeros(2, 3, 1, 1), None)] * 3  # 3 batches of 2 images, restarted at the end
    # The first batch is start-up and not counted; 5 images need 3 more batches (6 images), one after a restart.
    assert train_benchmark._images_per_s(loader, 5) == pytest.approx(6 / 0.5)
