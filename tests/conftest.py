import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights *and* BN statistics, scaled so activations stay O(1) through the whole network: a wrongly
    mapped or folded BatchNorm cannot hide behind identity statistics, and an absolute tolerance means something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) * 1.5 + 0.5)
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif t.dim() == 1:  # BN weight, fusion weights
                t.copy_(1.0 + torch.randn(t.shape, generator=gen) * 0.2)
            else:  # He-normal conv weights
                t.copy_(torch.randn(t.shape, generator=gen) * math.sqrt(2.0 / t[0].numel()))


@pytest.fixture(scope="session")
def randomise():
    """``randomise(model, seed=0)``: see :func:`_randomise`."""
    return _randomise


def _run_workers(fn, args: tuple, nprocs: int = 2, timeout: float = 60.0) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` forked processes; fail the test if any fails or they outlast ``timeout``.

    fork, as DataLoader workers do: spawn would re-import torch in each child (~5 s on two cores).
    """
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"distributed workers did not finish in {timeout:.0f} s")


@pytest.fixture(scope="session")
def run_workers():
    """``run_workers(fn, args, nprocs=2, timeout=60)``: see :func:`_run_workers`."""
    return _run_workers


class HostReads(torch.overrides.TorchFunctionMode):
    """Records every call that copies a tensor's data to the host (``.item()``, ``.tolist()``, ``.cpu()``,
    ``.numpy()``, ``.to("cpu")``) of a tensor on another device than ``device`` says, while active.

    ``device="any"`` records them on CPU tensors too, which lets a CPU test hold code to what it must do on a GPU.
    """

    NAMES = ("item", "tolist", "cpu", "numpy", "to")

    def __init__(self, device: str = "not-cpu") -> None:
        super().__init__()
        self.device = device
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.NAMES and args and isinstance(args[0], torch.Tensor) and self._watched(args[0]):
            if name != "to" or self._to_host(args[1:], kwargs):
                self.calls.append(name)
        return func(*args, **kwargs)

    def _watched(self, tensor: torch.Tensor) -> bool:
        return self.device == "any" or tensor.device.type != "cpu"

    @staticmethod
    def _to_host(args: tuple, kwargs: dict) -> bool:
        target = kwargs.get("device", args[0] if args else None)
        return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


@pytest.fixture
def host_reads():
    """``with host_reads(device="not-cpu") as reads: ...; reads.calls``: see :class:`HostReads`."""
    return HostReads
