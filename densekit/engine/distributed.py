"""torch.distributed setup for torchrun: gloo on CPU, nccl on GPUs."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The device a ``device=`` setting names, checked to exist here.

    ``auto``: this process's GPU (``cuda:LOCAL_RANK``) when CUDA is available, else the CPU; ``cuda`` is
    ``cuda:LOCAL_RANK`` too, so that every torchrun process takes its own GPU; ``cuda:N``, ``cpu`` and ``mps`` are
    taken as given. Raises ValueError saying what is missing and what to use instead.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r}: CUDA is not available in this PyTorch build or on this machine; "
                             "use cpu")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device={name!r}: MPS is not available on this machine; use cpu")
    elif device.type != "cpu":
        raise ValueError(f"device={name!r}: densekit runs on cpu, cuda and mps")
    return device


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """Join the process group if torchrun started us; returns ``(rank, world_size, device)``.

    ``device`` is a ``device=`` setting (see :func:`resolve_device`); the backend follows it: nccl on GPUs, gloo
    otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return get_rank(), world_size, resolved


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm synchronised across processes (``nn.SyncBatchNorm``), weights and statistics kept.

    timm's converter, not torch's: ``nn.SyncBatchNorm.convert_sync_batchnorm`` turns timm's ``BatchNormAct2d`` (BN
    and activation in one module, in every timm EfficientNet / MobileNetV3 backbone) into a plain SyncBatchNorm and
    silently drops the activation; timm's makes it a ``SyncBatchNormAct`` that keeps it.
    """
    from timm.layers import convert_sync_batchnorm as timm_convert

    return timm_convert(model)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_finite(value: torch.Tensor) -> bool:
    """True if ``value`` is finite on every rank (so all ranks stop together instead of deadlocking)."""
    ok = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def cleanup_distributed() -> None:
    """Leave the process group, all ranks together.

    The barrier first: a rank that tears gloo down while a peer is still using its connection can make the peer
    abort at exit ("terminate called without an active exception", seen in CI).
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
