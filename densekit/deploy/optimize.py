"""Inference-only rewrites of a densekit model: BatchNorm folding, channels_last weights, optional ``torch.compile``.

Folding uses :func:`torch.nn.utils.fusion.fuse_conv_bn_eval` on every convolution that a BatchNorm directly follows
in the same module path. "Directly follows" is read off the module structure, never guessed from registration
order alone, because a module's ``__init__`` order says nothing about its ``forward``:

* ``nn.Sequential`` children: a ``Conv2d`` immediately followed by a ``BatchNorm2d`` (densekit's ``ConvNorm``,
  torchvision's ``Conv2dNormActivation`` in the MobileNetV3 backbone);
* densekit's ``SeparableConv2d``: ``conv_pw`` -> ``bn``;
* timm's EfficientNet / MobileNetV3 modules: the ``(conv, bn)`` attribute pairs their ``forward`` runs back to back
  (:data:`_TIMM_PAIRS`); timm's ``BatchNormAct2d`` keeps its dropout / activation after the fold;
* the EfficientDet class / box towers, whose convs are shared across levels but whose BNs are per level: each level
  gets its own folded copy of the shared 1x1 pointwise conv, while the 3x3 depthwise conv stays shared. The pointwise
  conv is a plain matmul, so a per-level copy costs the same FLOPs as the shared one and the BN pass disappears;
  only ``levels x repeats`` small weight copies are added (about 0.25M parameters for D0).
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..modeling.dual_bn import unwrap_dual_bn
from ..modeling.heads.efficientdet import SharedConvTower
from ..modeling.layers import SeparableConv2d
from ..utils.memory import retain_freed_memory

__all__ = ["FoldedConvTower", "fold_batchnorm", "optimize_for_inference"]

# timm class name -> (conv attribute, bn attribute) pairs that its forward calls consecutively (timm 1.0 blocks).
_STEM = (("conv_stem", "bn1"), ("conv_head", "bn2"))
_S2D = (("conv_s2d", "bn_s2d"),)
_TIMM_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "EfficientNet": _STEM,
    "EfficientNetFeatures": _STEM,
    "MobileNetV3": _STEM,
    "MobileNetV3Features": _STEM,
    "ConvBnAct": (("conv", "bn1"),),
    "DepthwiseSeparableConv": _S2D + (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "InvertedResidual": _S2D + (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    "EdgeResidual": (("conv_exp", "bn1"), ("conv_pwl", "bn2")),
}


class FoldedConvTower(nn.Module):
    """:class:`SharedConvTower` with every per-level BN folded into a per-level copy of the shared pointwise conv.

    Computes exactly what the tower computes in eval mode (up to float rounding), with one op fewer per repeat.
    """

    def __init__(self, tower: SharedConvTower) -> None:
        super().__init__()
        # The depthwise convs stay shared: the BN follows the pointwise conv, so only that one needs per-level copies.
        self.dw = nn.ModuleList(conv.conv_dw for conv in tower.convs)
        self.pw = nn.ModuleList(
            nn.ModuleList(_fuse(conv.conv_pw, norm) for conv, norm in zip(tower.convs, norms)) for norms in tower.norms
        )
        self.act = tower.act
        self.predict = tower.predict

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for x, pws in zip(features, self.pw):
            for dw, pw in zip(self.dw, pws):
                x = self.act(pw(dw(x)))
            outputs.append(self.predict(x))
        return outputs


def _foldable_bn(bn: nn.Module) -> bool:
    """Whether ``bn`` is a BatchNorm whose eval-mode transform is a fixed per-channel affine."""
    if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.running_var is None:
        return False
    # Only plain BN and timm's BatchNormAct2d: other subclasses may change forward in ways folding would drop.
    return type(bn) is nn.BatchNorm2d or type(bn).__name__ == "BatchNormAct2d"


def _fuse(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """``conv`` with ``bn`` folded in (a new module; ``conv`` is untouched)."""
    if not _foldable_bn(bn):  # e.g. Identity where a SeparableConv2d has no norm
        return conv
    return fuse_conv_bn_eval(conv.eval(), bn.eval())


def _bn_remainder(bn: nn.Module) -> nn.Module:
    """What is left of ``bn`` once its affine lives in the conv: timm's BatchNormAct2d keeps drop + act."""
    rest = [m for name in ("drop", "act") if not isinstance(m := getattr(bn, name, nn.Identity()), nn.Identity)]
    if not rest:
        return nn.Identity()
    return rest[0] if len(rest) == 1 else nn.Sequential(*rest)


def _pairs(module: nn.Module) -> Iterator[tuple[str, str]]:
    """The ``(conv, bn)`` child-name pairs of ``module`` whose forward applies the BN right after the conv."""
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        yield from zip(names[:-1], names[1:])
    elif isinstance(module, SeparableConv2d):
        yield "conv_pw", "bn"
    elif type(module).__module__.startswith("timm."):
        yield from _TIMM_PAIRS.get(type(module).__name__, ())


def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, every BatchNorm that directly follows a convolution into it; returns how many were folded.

    The model must be in eval mode (folding bakes in the running statistics). A conv used in more than one place
    (shared weights) is only folded where its sharing is known, i.e. in :class:`SharedConvTower`. AdvProp's dual
    BatchNorms are first replaced by their main BNs (the inference ones; the auxiliary twins are dropped).
    """
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model: folding bakes in the BN running statistics")
    unwrap_dual_bn(model)
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    folded = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SharedConvTower):
                setattr(parent, name, FoldedConvTower(child))
                folded += sum(_foldable_bn(bn) for norms in child.norms for bn in norms)
        for conv_name, bn_name in list(_pairs(parent)):
            conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
            # A shared conv (or BN) feeds other paths too; folding one use would change the others.
            if not isinstance(conv, nn.Conv2d) or not _foldable_bn(bn) or uses[id(conv)] > 1 or uses[id(bn)] > 1:
                continue
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, _bn_remainder(bn))
            folded += 1
    return folded


def optimize_for_inference(
    model: nn.Module,
    channels_last: bool = True,
    fold_bn: bool = True,
    compile: bool = False,
    example_input: torch.Tensor | None = None,
    *,
    strict: bool = False,
    compile_mode: str | None = None,
    precision: str = "fp32",
    calibration: object = None,
    **quantize_options: object,
) -> nn.Module:
    """An eval-mode copy of ``model`` rewritten for inference; ``model`` itself is left untouched.

    Args:
        model: A densekit model (or any module).
        channels_last: Store 4-D weights NHWC; pass channels_last inputs too for oneDNN / cuDNN's fast paths.
        fold_bn: Fold every BatchNorm that directly follows a conv into that conv (see the module docstring).
        compile: ``torch.compile`` with inductor freezing (weights become constants: conv weights are pre-packed
            and every pointwise op is fused). For a densekit model the compiled functions are its
            ``compile_targets``: input normalisation and padding + network (+ the segmenter's upsampling and
            argmax), so that ``forward`` and ``forward_raw`` both use them while the data-dependent parts (NMS, per
            image cropping) stay eager; any other module is compiled whole. Shapes are static: each new input size
            compiles once more (fixed-size padding becomes constants of the graph). Compiled weights are frozen:
            re-run this function after changing the original model's weights.
        example_input: With ``compile``, one input to compile on now, so that a failure shows here rather than at
            the first real call. Without it compilation (and any failure) happens on the first call.
        strict: With ``compile``, raise if compiling ``example_input`` fails instead of warning and returning the
            uncompiled (but otherwise optimised) module.
        compile_mode: With ``compile``, ``torch.compile``'s ``mode``: ``None`` (inductor's default),
            ``"reduce-overhead"`` (CUDA graphs: one launch per call, for launch-bound small batches on a GPU; the
            compiled outputs live in the graph's memory, which the next call overwrites: clone what you keep),
            ``"max-autotune"`` (also benchmarks kernel choices while compiling: minutes, not seconds).
        precision: ``"fp32"``, or ``"bf16"`` / ``"int8"`` for a densekit model: its network in bf16 autocast or
            PT2E static int8 (BN folded, ``compile`` as above), post-processing in float;
            see :func:`densekit.deploy.quantize.quantize`, which raises ``QuantizationError`` naming what cannot
            be quantised (``model`` is untouched and still runs).
        calibration: With ``precision="int8"``: the calibration images (a dataset, loader or tensors).
        quantize_options: With bf16 / int8: ``num_images``, ``keep_float`` of :func:`~densekit.deploy.quantize.quantize`.

    Returns:
        The optimised copy, in eval mode. It is for inference only: folded BNs no longer train.

    On the CPU this also sets glibc's ``malloc`` to keep freed memory for reuse
    (:func:`densekit.utils.memory.retain_freed_memory`, process-wide): without it every forward pass page-faults its
    activations in again, a third of a compiled Lite0's time.
    """
    if _on_cpu(model):  # activations are reused from the heap instead of page-faulted in on every call
        retain_freed_memory()
    if precision != "fp32":
        from .quantize import quantize

        return quantize(model, calibration, precision, compile=compile, **quantize_options)  # type: ignore[arg-type]
    out = copy.deepcopy(model).eval()
    unwrap_dual_bn(out)  # AdvProp's auxiliary BNs are for training only
    if fold_bn:
        fold_batchnorm(out)
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    if compile:
        out = _compile(out, example_input, channels_last, strict, compile_mode)
    return out


def _on_cpu(model: nn.Module) -> bool:
    first = next(iter(model.parameters()), None)
    return first is None or first.device.type == "cpu"


def compile_frozen(fn: Callable, mode: str | None = None) -> Callable:
    """``torch.compile(fn)`` with inductor freezing and static shapes, the configuration the benchmark times.

    Freezing turns weights into constants, so that inductor pre-packs convolution weights for oneDNN and fuses the
    following pointwise ops (bias, ReLU, hardswish, ...) into the convolution. Dynamo reads the switch while it
    traces (at the first call and at every recompile), so each call runs with it on; it is not set globally, which
    would freeze every other model the process compiles. ``torch.compile(options={"freezing": True})`` is not
    enough: measured on LR-ASPP at 512x1024, it left unfused ``aten::mkldnn_convolution`` calls (74 ms) where
    this gives pre-packed, fused ``mkldnn::_convolution_pointwise`` (56 ms).
    Calls must run without autograd (``torch.inference_mode`` / ``no_grad``), as freezing requires. ``mode`` is
    ``torch.compile``'s (see :func:`optimize_for_inference`).
    """
    from torch._inductor import config

    compiled = torch.compile(fn, dynamic=False, mode=mode)

    def call(*args: object, **kwargs: object) -> object:
        with config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return FrozenCompiled(fn, call) if isinstance(fn, nn.Module) else call


class FrozenCompiled(nn.Module):
    """What :func:`compile_frozen` returns for a module: still a module (it can be a child of another one, e.g.
    the network inside a detection wrapper), whose ``forward`` is the compiled call."""

    def __init__(self, module: nn.Module, call: Callable) -> None:
        super().__init__()
        self.module = module  # the original, for its attributes and weights
        self._call = call

    def forward(self, *args: object, **kwargs: object) -> object:
        return self._call(*args, **kwargs)


def _compile(
    model: nn.Module, example_input: torch.Tensor | None, channels_last: bool, strict: bool, mode: str | None = None
) -> nn.Module:
    """``model`` with its network compiled, or ``model`` unchanged (with a warning) if compiling fails."""
    fallback = copy.deepcopy(model)  # compiling is in place; keep an untouched copy to return on failure
    targets = model.compile_targets() if hasattr(model, "compile_targets") else ()
    try:
        if targets:
            for name in targets:
                # The class's own method bound to this model; the compiled function then shadows it on the instance.
                setattr(model, name, compile_frozen(getattr(type(model), name).__get__(model), mode))
        else:  # an instance attribute: the module stays a module, and nn.Module.__call__ finds it
            model.forward = compile_frozen(model.forward, mode)
        if example_input is not None:
            x = example_input.contiguous(memory_format=torch.channels_last) if channels_last else example_input
            with torch.inference_mode():
                if targets:
                    batch = model.stack_images(x)[0]
                    for name in targets:
                        getattr(model, name)(batch)
                else:
                    model(x)
    except Exception as err:  # noqa: BLE001 - dynamo / inductor raise many types; all mean "not compiled"
        msg = f"optimize_for_inference: torch.compile failed ({type(err).__name__}: {err})"
        if strict:
            raise RuntimeError(msg) from err
        warnings.warn(msg + "; returning the uncompiled module", RuntimeWarning, stacklevel=3)
        return fallback
    return model
