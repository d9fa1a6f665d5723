"""Inference-only rewrites of a densekit model: BatchNorm folding, channels_last weights, optional ``torch.compile``.

Folding uses :func:`torch.nn.utils.fusion.fuse_conv_bn_eval` on every convolution that a BatchNorm directly follows
in the same module path. "Directly follows" is read off the module structure, never guessed from registration
order alone, because a module's ``__init__`` order says nothing about its ``forward``:

* ``nn.Sequential`` children: a ``Conv2d`` immediately followed by a ``BatchNorm2d`` (densekit's ``ConvNorm``,
  torchvision's ``Conv2dNormActivation`` in the MobileNetV3 backbone);
* densekit's ``SeparableConv2d``: ``conv_pw`` -> ``bn``;
* inside a backbone, the rules of its family (:class:`~densekit.modeling.backbones.family.BackboneFamily`
  ``fold_rules``), e.g. the ``(conv, bn)`` attribute pairs that timm's EfficientNet / MobileNetV3 / CoAtNet blocks
  run back to back (:mod:`densekit.modeling.backbones.timm_folding`); timm's ``BatchNormAct2d`` keeps its dropout /
  activation after the fold;
* the EfficientDet class / box towers, whose convs are shared across levels but whose BNs are per level: each level
  gets its own folded copy of the shared 1x1 pointwise conv, while the 3x3 depthwise conv stays shared. The pointwise
  conv is a plain matmul, so a per-level copy costs the same FLOPs as the shared one and the BN pass disappears;
  only ``levels x repeats`` small weight copies are added (about 0.25M parameters for D0).

A BatchNorm that no rule covers is not folded, and :func:`fold_batchnorm` says so (a warning per block class, or an
error with ``strict=True``) instead of leaving the model slower without a word; :func:`unfolded_batchnorms` lists
every BN left and why.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..modeling.backbones.family import BACKBONE_FAMILIES, BlockFolding, FoldRules, family_of_backbone
from ..modeling.dual_bn import unwrap_dual_bn
from ..modeling.heads.efficientdet import SharedConvTower
from ..modeling.layers import SeparableConv2d
from ..utils.memory import retain_freed_memory

__all__ = ["FoldedConvTower", "fold_batchnorm", "optimize_for_inference", "unfolded_batchnorms"]

#: densekit's separable conv: ``conv_dw -> conv_pw -> bn`` (the BN may be an Identity).
_SEPARABLE = BlockFolding(pairs=(("conv_pw", "bn"),))


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


def _structural_folding(module: nn.Module) -> BlockFolding | None:
    """Folding read off the module type: ``nn.Sequential`` conv -> BN neighbours, densekit's ``SeparableConv2d``."""
    if isinstance(module, nn.Sequential):
        children = list(module._modules.items())
        pairs = ((a, b) for (a, conv), (b, _) in zip(children, children[1:]) if isinstance(conv, nn.Conv2d))
        return BlockFolding(pairs=tuple(pairs))
    return _SEPARABLE if isinstance(module, SeparableConv2d) else None


def _family_rules(model: nn.Module) -> dict[int, FoldRules]:
    """``id(module)`` -> the fold rules of the family of the backbone that contains it (the innermost one)."""
    rules: dict[int, FoldRules] = {}
    for module in model.modules():  # parents before children: an inner backbone overrides an outer one
        family = family_of_backbone(module)
        if family is not None:
            rules.update((id(sub), family.fold_rules) for sub in module.modules())
    return rules


def _any_family_rules(module: nn.Module) -> BlockFolding | None:
    """Outside a densekit backbone (e.g. a bare timm model handed to :func:`fold_batchnorm`): the rules of whichever
    family defines the block, so that folding does not depend on the wrapper."""
    return next((f for family in BACKBONE_FAMILIES.values() if (f := family.fold_rules(module)) is not None), None)


def _block_folding(module: nn.Module, rules: dict[int, FoldRules]) -> BlockFolding:
    return _structural_folding(module) or rules.get(id(module), _any_family_rules)(module) or BlockFolding()


def _use_counts(model: nn.Module) -> dict[int, int]:
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    return uses


def _why_not_foldable(parent: nn.Module, conv_name: str, bn_name: str, uses: dict[int, int]) -> str | None:
    """Why the rule's ``(conv, bn)`` pair of ``parent`` cannot be folded; None when it can."""
    conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
    if not isinstance(conv, nn.Conv2d):
        return f"{conv_name} before it is a {type(conv).__name__}, not a Conv2d"
    if not _foldable_bn(bn):
        return f"a {type(bn).__name__} is not folded (only BatchNorm2d and timm's BatchNormAct2d with running stats)"
    if uses[id(conv)] > 1 or uses[id(bn)] > 1:  # folding one use of a shared module would change the others
        return f"{conv_name} or the BN is shared with another path"
    return None


def _fold_towers(model: nn.Module) -> int:
    """Replace every :class:`SharedConvTower` by its :class:`FoldedConvTower`; returns the BNs folded."""
    folded = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SharedConvTower):
                setattr(parent, name, FoldedConvTower(child))
                folded += sum(_foldable_bn(bn) for norms in child.norms for bn in norms)
    return folded


def fold_batchnorm(model: nn.Module, *, strict: bool = False) -> int:
    """Fold, in place, every BatchNorm that directly follows a convolution into it; returns how many were folded.

    The model must be in eval mode (folding bakes in the running statistics). A conv used in more than one place
    (shared weights) is only folded where its sharing is known, i.e. in :class:`SharedConvTower`. AdvProp's dual
    BatchNorms are first replaced by their main BNs (the inference ones; the auxiliary twins are dropped). Inside a
    backbone, its family's fold rules say which of its blocks' BNs follow which conv.

    Args:
        model: The module to fold.
        strict: Raise instead of warning when a BatchNorm is left that no rule covers (a block whose ``forward`` no
            rule describes, e.g. a new timm block): see :func:`unfolded_batchnorms`.

    Raises:
        ValueError: the model is in training mode; with ``strict``, a BatchNorm that no rule covers.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model: folding bakes in the BN running statistics")
    unwrap_dual_bn(model)
    folded = _fold_towers(model)
    uses, rules = _use_counts(model), _family_rules(model)
    for parent in list(model.modules()):
        for conv_name, bn_name in _block_folding(parent, rules).pairs:
            if _why_not_foldable(parent, conv_name, bn_name, uses) is None:
                bn = getattr(parent, bn_name)
                setattr(parent, conv_name, fuse_conv_bn_eval(getattr(parent, conv_name), bn))
                setattr(parent, bn_name, _bn_remainder(bn))
                folded += 1
    _report_uncovered(model, strict)
    return folded


def unfolded_batchnorms(model: nn.Module) -> dict[str, str | None]:
    """Every BatchNorm in ``model`` (by module path) with why it is not folded, None where no rule covers it.

    After :func:`fold_batchnorm` these are the BNs the optimised model still runs: the ones its blocks' rules keep
    on purpose (a pre-norm that no conv precedes), those whose rule cannot apply (a shared conv), and the uncovered.
    """
    uses, rules = _use_counts(model), _family_rules(model)
    out: dict[str, str | None] = {}
    for path, parent in model.named_modules():
        block = _block_folding(parent, rules)
        conv_before = {bn: conv for conv, bn in block.pairs}
        kept = dict(block.kept)
        for name, child in parent.named_children():
            if not isinstance(child, _BatchNorm):
                continue
            why = kept.get(name)
            if why is None and name in conv_before:
                conv = conv_before[name]
                why = _why_not_foldable(parent, conv, name, uses) or f"foldable into {conv} (not folded yet)"
            out[f"{path}.{name}" if path else name] = why
    return out


def _report_uncovered(model: nn.Module, strict: bool) -> None:
    """Warn once per block class (or raise) about the BatchNorms that no fold rule covers."""
    by_class: dict[str, list[str]] = {}
    for path, why in unfolded_batchnorms(model).items():
        if why is None:
            parent = model.get_submodule(path.rpartition(".")[0])
            by_class.setdefault(f"{type(parent).__module__}.{type(parent).__qualname__}", []).append(path)
    messages = [_uncovered_message(cls, paths) for cls, paths in by_class.items()]
    if messages and strict:
        raise ValueError("\n".join(messages))
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=3)


def _uncovered_message(cls: str, paths: list[str]) -> str:
    names = ", ".join(sorted({path.rpartition(".")[2] for path in paths}))
    return (
        f"fold_batchnorm: no folding rule covers the BatchNorm(s) {names} of {cls} ({len(paths)} in all, e.g. "
        f"{paths[0]}): they stay unfolded and run at inference. Describe the block's (conv, bn) pairs, or the BNs "
        "it keeps and why, in its backbone family's fold_rules (densekit/modeling/backbones)"
    )


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

        _check_quantized_arguments(precision, compile, fold_bn, example_input, strict, compile_mode)
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


def _check_quantized_arguments(precision: str, compile: bool, fold_bn: bool, example_input: torch.Tensor | None,
                               strict: bool, compile_mode: str | None) -> None:
    """bf16 / int8 take their own path (:func:`densekit.deploy.quantize.quantize`): refuse the fp32 path's arguments it
    would drop, and warn that without ``compile`` it runs the slow reference path."""
    dropped = [name for name, given in (("example_input", example_input is not None), ("strict", strict),
                                        ("compile_mode", compile_mode is not None), ("fold_bn=False", not fold_bn))
               if given]
    if dropped:
        raise ValueError(f"optimize_for_inference(precision={precision!r}) does not use {', '.join(dropped)}: the "
                         f"{precision} path folds BatchNorm itself and compiles on its first call; drop them")
    if not compile:
        warnings.warn(f"precision={precision!r} without compile=True runs the quantise / dequantise reference path "
                      "eagerly (Lite0 int8: 3.9x slower than fp32 compiled, docs/benchmarks.md); pass compile=True "
                      "for the int8 / bf16 kernels", stacklevel=3)


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
