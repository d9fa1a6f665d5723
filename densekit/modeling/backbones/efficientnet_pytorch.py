"""Convert EfficientNet weights from the efficientnet_pytorch (lukemelas) layout to timm's.

efficientnet_pytorch numbers its MBConv blocks flat (``_blocks.0`` ... ``_blocks.15`` for B0 / Lite0) and names
the layers of every block the same way whether or not it expands; timm groups blocks by stage
(``blocks.{stage}.{j}``) and uses a different block class, with different layer names, for the expansion-free
first stage. Both the stage grouping and each block's class are read off the *target* timm model, so one
converter serves every EfficientNet / EfficientNet-Lite / MnasNet-style model without per-model tables.

Padding is not in the weights: weights ported from TensorFlow (as efficientnet_pytorch's are) expect TF "same"
padding, i.e. timm's ``tf_*`` models. Shapes cannot tell the two apart; the Lite0 ImageNet test does.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ...checkpoint.io import CheckpointError, format_key_report

# efficientnet_pytorch block layer -> timm layer, per timm block class.
_DS_BLOCK = {  # timm DepthwiseSeparableConv: no expansion conv
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_IR_BLOCK = {  # timm InvertedResidual: expand / depthwise / project
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_MAPS = {"DepthwiseSeparableConv": _DS_BLOCK, "InvertedResidual": _IR_BLOCK}
_STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1"}
_HEAD = {"_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}  # absent from features_only models

_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(_\w+)\.(\w+)$")


def is_efficientnet_pytorch_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` is keyed like efficientnet_pytorch (``_conv_stem.weight``, ``_blocks.N.*``)."""
    return "_conv_stem.weight" in state_dict and any(k.startswith("_blocks.") for k in state_dict)


def _find_efficientnet(target: nn.Module) -> tuple[str, nn.Module]:
    """The (prefix, module) of the timm EfficientNet inside ``target``: the module with conv_stem, bn1, blocks."""
    for name, module in target.named_modules():
        if all(hasattr(module, attr) for attr in ("conv_stem", "bn1", "blocks")):
            return (name + "." if name else ""), module
    raise CheckpointError(
        f"efficientnet_pytorch weights need a timm EfficientNet-style model (conv_stem, bn1, blocks); "
        f"{type(target).__name__} has none"
    )


def convert_efficientnet_pytorch(
    state_dict: Mapping[str, torch.Tensor], target: nn.Module, source: str = "efficientnet_pytorch checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch state_dict into ``target``'s keys and check it fits.

    Args:
        state_dict: Keys like ``_conv_stem.weight``, ``_blocks.3._expand_conv.weight``, ``_fc.bias``.
        target: A timm EfficientNet-family model, or any module containing one (e.g. a :class:`TimmBackbone`,
            whose keys then carry the ``body.`` prefix). Its blocks define the flat-index -> stage mapping.
        source: Name of the checkpoint, quoted in errors.

    Returns:
        A state_dict keyed as ``target.state_dict()``. Head tensors (``_conv_head``, ``_bn1``, ``_fc``) map to
        ``conv_head`` / ``bn2`` / ``classifier`` when the target has them and are dropped otherwise (features_only).

    Raises:
        CheckpointError: block counts or block kinds differ, keys are left over or missing, or shapes differ.
            The message names the offending keys.
    """
    prefix, net = _find_efficientnet(target)
    # Flat block index -> (timm key prefix, layer map); enumeration order of timm's nested Sequentials is the
    # execution order, the same order efficientnet_pytorch numbers its blocks in.
    flat: list[tuple[str, str]] = []
    for stage_idx, stage in enumerate(net.blocks):
        for block_idx, block in enumerate(stage):
            flat.append((f"{prefix}blocks.{stage_idx}.{block_idx}.", type(block).__name__))

    src_blocks = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))}
    if src_blocks != set(range(len(flat))):
        raise CheckpointError(
            f"{source}: has blocks {_ranges(src_blocks)} but the target has {len(flat)} blocks "
            f"(stages of {[len(s) for s in net.blocks]}); it is a different EfficientNet variant"
        )

    own = target.state_dict()
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped: list[str] = []
    for key, value in state_dict.items():
        new_key = _map_key(key, flat, prefix, own)
        if new_key is None:
            m = _BLOCK_KEY.match(key)
            block_cls = flat[int(m.group(1))][1] if m else ""
            why = f" (target block is a timm {block_cls})" if m and block_cls not in _BLOCK_MAPS else ""
            unmapped.append(key + why)
        elif new_key:  # "" marks a head tensor the target does not have
            out[new_key] = value
            origin[new_key] = key

    missing = [k for k in own if k not in out]
    mismatched = [
        f"{k} (from {origin[k]}): checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in out.items()
        if k in own and v.shape != own[k].shape
    ]
    unexpected = [f"{origin[k]} -> {k}" for k in out if k not in own] + unmapped
    if missing or mismatched or unexpected:
        source = f"{source} (efficientnet_pytorch layout)"
        raise CheckpointError(format_key_report(source, missing, unexpected, mismatched))
    return out


def _map_key(key: str, flat: list[tuple[str, str]], prefix: str, own: Mapping[str, torch.Tensor]) -> str | None:
    """timm key for one efficientnet_pytorch key; "" to drop it (head absent in target), None if unknown."""
    if m := _BLOCK_KEY.match(key):
        block_prefix, block_cls = flat[int(m.group(1))]
        layer_map = _BLOCK_MAPS.get(block_cls)
        if layer_map is None or m.group(2) not in layer_map:
            return None  # e.g. an EdgeResidual (EfficientNetV2 / EdgeTPU) block: no efficientnet_pytorch twin
        return f"{block_prefix}{layer_map[m.group(2)]}.{m.group(3)}"
    if m := _TOP_KEY.match(key):
        layer, param = m.groups()
        if layer in _STEM:
            return f"{prefix}{_STEM[layer]}.{param}"
        if layer in _HEAD:
            new_key = f"{prefix}{_HEAD[layer]}.{param}"
            return new_key if new_key in own else ""
    return None


def _ranges(indices: set[int]) -> str:
    if not indices:
        return "none"
    s = sorted(indices)
    return f"{s[0]}..{s[-1]} ({len(s)})" if s == list(range(s[0], s[-1] + 1)) else str(s)
