"""Model complexity: parameter counts and multiply-adds (MACs) of the network.

MACs are what the EfficientDet paper calls FLOPs: one multiply-add counts once. They are counted with
:class:`torch.utils.flop_counter.FlopCounterMode`, which counts the convolutions and matrix products (2 FLOPs per
multiply-add) and ignores element-wise work (activations, BN, fusion sums), the same convention as the paper.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)

META = torch.device("meta")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements in ``module``.

    Args:
        module: Any module; shared parameters are counted once (``parameters()`` de-duplicates them).
        trainable_only: Count only parameters with ``requires_grad``.

    Returns:
        The element count.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def to_meta(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (shapes only, no storage).

    Parameters and buffers are swapped in through ``deepcopy``'s memo, so their data is never copied: copying a
    D7x this way is as cheap as copying a D0, whatever device the original is on.
    """
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device=META), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device=META)
    return copy.deepcopy(model, memo)


def _network(model: nn.Module) -> Callable[[torch.Tensor], object]:
    # Detectors expose the network without post-processing as forward_raw; plain modules are counted whole.
    return getattr(model, "forward_raw", model)


def _count(model: nn.Module, image_size: Sequence[int], batch: int, device: torch.device) -> int:
    x = torch.zeros(batch, 3, int(image_size[0]), int(image_size[1]), device=device)
    was_training = model.training
    model.eval()  # eval: BN must not update running stats, and the counted graph is the inference one
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            _network(model)(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_macs(model: nn.Module, image_size: Sequence[int], batch: int = 1) -> int:
    """Multiply-adds of one ``model.forward_raw`` call (the network, no pre- or post-processing).

    The count runs on a meta-device copy of the model, so it takes well under a second even for D7x at 1536 px
    and never touches the model's weights; if the model cannot run on the meta device it falls back to a real
    forward pass on the CPU. A model whose ``forward_raw`` pads its input (densekit's EfficientDet pads to a
    multiple of ``2 ** max_level``) is counted at the padded size, because that is what it computes.

    Args:
        model: A densekit detector (anything with ``forward_raw``) or a plain module taking ``[B, 3, H, W]``.
        image_size: Input ``(H, W)``.
        batch: Batch size.

    Returns:
        The number of multiply-adds.
    """
    try:
        return _count(to_meta(model), image_size, batch, META)
    except (NotImplementedError, RuntimeError) as err:
        # Data-dependent ops (e.g. .item(), nonzero) have no meta kernel or no meaning on meta tensors.
        device = next(iter(model.parameters()), torch.empty(0)).device
        if device == META:  # nothing to fall back to: the model has no weights to run with
            raise RuntimeError(f"count_macs: the model cannot run on the meta device ({err}); build it on the CPU") from err
        log.info("meta-device MAC count failed (%s); counting with a real forward pass on %s", err, device)
    return _count(model, image_size, batch, device)


def format_count(n: float, digits: int = 2) -> str:
    """``n`` with a K / M / B suffix, e.g. ``3880067 -> "3.88M"``, ``2.49e9 -> "2.49B"``."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f}{suffix}"
    return f"{n:g}"
