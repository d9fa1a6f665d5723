"""Checkpoint import through ``weights=``: layout detection and the converters to densekit's keys.

Recognised layouts, detected from the keys:

* densekit's own checkpoints (``backbone.body.*`` / ``neck.*`` / ``head.*``, bare or under ``"model"``);
* efficientdet-pytorch (effdet) ``EfficientDet`` state_dicts, TF-ported (``tf_efficientdet_*``) and native, with
  either of its head BatchNorm orders;
* torchvision ``lraspp_mobilenet_v3_large`` state_dicts (``backbone.<N>.*``, ``classifier.*``);
* AdvProp training checkpoints (``train.advprop``): their auxiliary BatchNorms (``*.aux.*``) are dropped when the
  model has none, so evaluation and export load the main BatchNorms;
* backbone-only checkpoints (timm, efficientnet_pytorch, torchvision MobileNetV3), loaded into ``model.backbone``
  through :meth:`~densekit.modeling.backbones.base.Backbone.load_weights`. The efficientnet_pytorch converter stays
  with the timm backbone (:mod:`densekit.modeling.backbones.efficientnet_pytorch`): it is read off the backbone's
  timm block structure, and only that backbone's ``load_weights`` uses it.

Whatever the layout, loading is all-or-nothing (:func:`~densekit.checkpoint.io.load_state_dict_checked`).
"""
from __future__ import annotations

import logging
import re

import torch
from torch import nn

from ..modeling.dual_bn import strip_aux_bn_keys
from .io import CheckpointError, load_state_dict_checked

log = logging.getLogger(__name__)


def is_effdet_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` is keyed like effdet's ``EfficientDet`` (``fpn.cell.*``, ``class_net.*``)."""
    return any(k.startswith("fpn.cell.") for k in state_dict) and any(k.startswith("class_net.") for k in state_dict)


def convert_effdet(state_dict: dict[str, torch.Tensor], num_backbone_levels: int) -> dict[str, torch.Tensor]:
    """Rename an effdet ``EfficientDet`` state_dict to densekit's :class:`EfficientDet` layout.

    Args:
        state_dict: effdet's keys (``backbone.*``, ``fpn.*``, ``class_net.*``, ``box_net.*``).
        num_backbone_levels: Backbone feature count; effdet numbers the extra pyramid levels after them.
    """

    def extra_level(m: re.Match) -> str:
        return f"neck.extra_levels.{int(m[1]) - num_backbone_levels}.lateral.{m[2]}"

    rules: list[tuple[str, object]] = [
        (r"^backbone\.", "backbone.body."),
        (r"^fpn\.resample\.(\d+)\.conv\.(.*)$", extra_level),
        (r"^fpn\.cell\.(\d+)\.fnode\.(\d+)\.combine\.resample\.(\d+)\.conv\.(.*)$", r"neck.layers.\1.nodes.\2.lateral.\3.\4"),
        (r"^fpn\.cell\.(\d+)\.fnode\.(\d+)\.combine\.edge_weights$", r"neck.layers.\1.nodes.\2.fusion_weight"),
        (r"^fpn\.cell\.(\d+)\.fnode\.(\d+)\.after_combine\.conv\.(.*)$", r"neck.layers.\1.nodes.\2.conv.\3"),
        (r"^(class|box)_net\.conv_rep\.(\d+)\.(.*)$", r"head.\1_net.convs.\2.\3"),
        # effdet's default head BN order is [repeat][level] with a Sequential('bn'); densekit's is [level][repeat].
        (r"^(class|box)_net\.bn_rep\.(\d+)\.(\d+)\.bn\.(.*)$", r"head.\1_net.norms.\3.\2.\4"),
        # ...and its torchscript-friendly toggled order is already [level][repeat].
        (r"^(class|box)_net\.bn_rep\.(\d+)\.(\d+)\.(.*)$", r"head.\1_net.norms.\2.\3.\4"),
        (r"^(class|box)_net\.predict\.(.*)$", r"head.\1_net.predict.\2"),
    ]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            out[key] = value  # left as is: reported as unexpected by the checked load
    return out


def is_torchvision_lraspp_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` is keyed like torchvision's ``LRASPP`` (``backbone.<N>.*``, ``classifier.cbr.*``)."""
    return any(k.startswith("classifier.cbr.") for k in state_dict) and any(
        re.match(r"^backbone\.\d+\.", k) for k in state_dict
    )


def convert_torchvision_lraspp(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision ``LRASPP`` state_dict to densekit's :class:`Segmenter` with an ``LRASPPHead``.

    torchvision wraps ``mobilenet_v3.features`` in an ``IntermediateLayerGetter`` (``backbone.<N>.*``, densekit:
    ``backbone.features.<N>.*``) and names the head ``classifier`` (densekit: ``head``, same sub-module names).
    The densekit model must read its stride-8 skip where torchvision does (``backbone.stage_start_levels: [3]``,
    as in ``conf/model/lraspp_mobilenet_v3_*.yaml``); the tensors cannot tell.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = re.sub(r"^backbone\.(\d+)\.", r"backbone.features.\1.", key)
        out[re.sub(r"^classifier\.", "head.", key)] = value
    return out


def to_model_layout(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], str] | None:
    """``state_dict`` renamed to ``model``'s keys and a description of its layout for messages, or ``None`` when it
    holds no detector / segmenter keys at all (backbone-only weights, for ``model.backbone.load_weights``).

    An AdvProp run's checkpoint also holds its auxiliary BatchNorms; a plain model (evaluation, export, fine-tuning
    without AdvProp) takes the main ones and the auxiliary tensors are left out here."""
    state_dict, dropped = strip_aux_bn_keys(model, state_dict)
    if dropped:
        log.info("%s: %d auxiliary (AdvProp) BatchNorm tensors ignored; the main BatchNorms are loaded", source, len(dropped))
    if is_effdet_layout(state_dict):
        return convert_effdet(state_dict, len(model.backbone.feature_specs)), f"{source} (efficientdet-pytorch layout)"
    if is_torchvision_lraspp_layout(state_dict):
        return convert_torchvision_lraspp(state_dict), f"{source} (torchvision LR-ASPP layout)"
    if any(k.startswith(("backbone.", "neck.", "head.")) for k in state_dict):
        return state_dict, source
    return None


def load_state_dict_any(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load an in-memory state_dict of any recognised layout (the module docstring lists them), all-or-nothing.
    Files reach it through :func:`densekit.checkpoint.weights.read_model_weights`."""
    converted = to_model_layout(model, state_dict, source)
    if converted is not None:
        load_state_dict_checked(model, *converted)
        return
    # No detector keys at all: treat it as backbone weights (timm / efficientnet_pytorch / torchvision).
    try:
        model.backbone.load_weights(state_dict, source=source)
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}\n  ({source} is neither a densekit nor an efficientdet-pytorch detector checkpoint, "
            "and does not fit the backbone either)"
        ) from None
