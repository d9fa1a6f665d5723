"""Any timm model with ``features_only`` support as a densekit :class:`Backbone`.

The timm model is kept, unmodified, as ``self.body``: its state_dict keys are exactly timm's features_only keys
under ``body.``, which is what efficientdet-pytorch checkpoints map onto (``backbone.*`` -> ``backbone.body.*``).

Most timm models run at any input size. CoAtNet, MaxViT and CoAtNeXt (timm's ``maxxvit`` module) do not: their
relative-position tables are sized for one input at construction (``img_size=``), so this backbone builds them at
the size the model is built for (``image_size``) and refuses any other input size with a message naming it.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from torch import nn

from ...checkpoint.io import CheckpointError, load_state_dict_checked
from ..grad_checkpoint import full_recomputation
from ._download import download_errors_explained, ensure_download_possible, hf_hub_cached, torch_hub_cached
from .base import Backbone, FeatureSpec, level_name
from .efficientnet_pytorch import convert_efficientnet_pytorch, is_efficientnet_pytorch_layout
from .family import BACKBONE_FAMILIES, BackboneFamily, unknown_backbone_message
from .timm_folding import timm_fold_rules

_RESERVED_KWARGS = ("features_only", "out_indices", "pretrained", "img_size")

#: timm modules whose models size attention tables for one input at construction (CoAtNet, MaxViT, CoAtNeXt).
SIZED_MODULES = ("maxxvit",)
_REL_POS_TABLE = "relative_position_bias_table"


def needs_image_size(name: str) -> bool:
    """Whether timm model ``name`` must be built for its input size (``img_size``) and then only runs at that size."""
    from timm.models import is_model_in_modules

    return timm.is_model(name) and is_model_in_modules(name.split(".", 1)[0], SIZED_MODULES)


def named_weights_normalization(name: str) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` of the timm weights that ``name`` selects explicitly, or None.

    A name selects weights explicitly with a pretrained tag (``tf_efficientnet_b0.ap_in1k``: AdvProp's ImageNet
    weights, trained on inputs in [-1, 1]) or as one of timm's legacy aliases of a tagged name
    (``tf_efficientnet_b0_ap``). An untagged architecture name selects nothing: its normalisation is the config's.
    """
    from timm.models import get_pretrained_cfg, split_model_name_tag

    name = _current_name(name)
    if not timm.is_model(name) or not split_model_name_tag(name)[1]:
        return None
    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.mean or not cfg.std:
        return None
    return [float(v) for v in cfg.mean], [float(v) for v in cfg.std]


def _current_name(name: str) -> str:
    """timm's current name for a deprecated alias (``tf_efficientnet_b0_ap`` -> ``tf_efficientnet_b0.ap_in1k``)."""
    from timm.models import get_deprecated_models

    return get_deprecated_models().get(name) or name


def _build_size(name: str, image_size: Sequence[int] | int | None) -> tuple[int, int]:
    """``image_size`` as ``(H, W)`` for a size-bound model, refusing a missing size or one its stages cannot halve."""
    if image_size is None:
        raise ValueError(
            f"{name!r} needs its input size at construction (its relative-position tables are sized for it): pass "
            "image_size=(H, W), e.g. create_backbone(name, image_size=(512, 512)); models read it from model.image_size"
        )
    size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(v) for v in image_size)
    if len(size) != 2 or any(v <= 0 or v % 32 for v in size):
        raise ValueError(f"{name!r} needs an image_size of two multiples of 32 (its stride), got {image_size!r}")
    return size  # type: ignore[return-value]


def _feature_table(name: str, timm_kwargs: dict[str, Any]) -> list[tuple[int, int]]:
    """``(reduction, channels)`` of every feature the timm model can return, in timm's index order."""
    try:
        # On the meta device no weights are allocated or initialised: the probe costs ~0.1 s even for B7.
        with torch.device("meta"):
            probe = timm.create_model(name, features_only=True, pretrained=False, **timm_kwargs)
    except Exception:
        # Some models compute buffers in __init__ in ways the meta device refuses: retry with a real build,
        # whose error (if any) is then the model's own.
        try:
            probe = timm.create_model(name, features_only=True, pretrained=False, **timm_kwargs)
        except Exception as err:  # timm raises RuntimeError, AssertionError, TypeError... depending on the model
            raise ValueError(f"timm cannot build {name!r} with features_only=True: {type(err).__name__}: {err}") from err
    return [(int(info["reduction"]), int(info["num_chs"])) for info in probe.feature_info.info]


def _out_indices(name: str, table: list[tuple[int, int]], out_levels: Sequence[int]) -> list[int]:
    """timm ``out_indices`` for the requested levels: per level, the deepest feature with stride ``2**level``."""
    by_level: dict[int, int] = {}
    for index, (reduction, _) in enumerate(table):
        if reduction > 0 and reduction & (reduction - 1) == 0:  # non power-of-two strides have no level
            by_level[reduction.bit_length() - 1] = index  # later index wins: the end of the stage
    missing = [lvl for lvl in out_levels if lvl not in by_level]
    if missing:
        raise ValueError(
            f"timm model {name!r} has no feature at level(s) {missing} (stride {[2**m for m in missing]}); "
            f"it offers levels {sorted(by_level)} (strides {sorted({r for r, _ in table})})"
        )
    return [by_level[lvl] for lvl in out_levels]


def _check_levels(out_levels: Sequence[int]) -> list[int]:
    levels = [int(lvl) for lvl in out_levels]
    if not levels or len(set(levels)) != len(levels):
        raise ValueError(f"out_levels must be non-empty and free of duplicates, got {tuple(out_levels)}")
    return sorted(levels)


class TimmBackbone(Backbone):
    """Multi-scale features from a timm model built with ``features_only=True``.

    Feature ``"c{L}"`` is the output of the last module whose stride is ``2**L`` (timm's stage ends), so for
    ``tf_efficientnet_b0`` the default levels (3, 4, 5) give strides 8/16/32 with 40/112/320 channels.

    Args:
        name: Any timm model name (optionally with a pretrained tag, ``"resnet50.a1_in1k"``).
        out_levels: Pyramid levels to return; level L has stride ``2**L``.
        pretrained: Download timm's pretrained weights (fails fast with a clear message when offline).
        image_size: ``(H, W)`` (or one int) the backbone will run at. Used only by the models that must know it
            at construction (:func:`needs_image_size`: CoAtNet, MaxViT), which then refuse other input sizes;
            ignored by every other model.
        **timm_kwargs: Passed to ``timm.create_model`` (e.g. ``drop_path_rate=0.2``).

    Raises:
        ValueError: unknown model, no features_only support, a requested level the model does not have, or a
            size-bound model without a usable ``image_size``.
    """

    def __init__(
        self,
        name: str,
        out_levels: Sequence[int] = (3, 4, 5),
        pretrained: bool = False,
        image_size: Sequence[int] | int | None = None,
        **timm_kwargs: Any,
    ):
        super().__init__()
        reserved = [k for k in _RESERVED_KWARGS if k in timm_kwargs]
        if reserved:
            raise TypeError(f"TimmBackbone sets {reserved} itself; use out_levels / pretrained / image_size instead")
        if not timm.is_model(name):
            raise ValueError(unknown_backbone_message(name))
        self.name = name
        #: The one input size a size-bound model accepts; None for models that run at any size.
        self.input_size: tuple[int, int] | None = None
        if needs_image_size(name):
            self.input_size = _build_size(name, image_size)
            timm_kwargs = {**timm_kwargs, "img_size": self.input_size}
        levels = _check_levels(out_levels)
        table = _feature_table(name, timm_kwargs)
        out_indices = _out_indices(name, table, levels)

        build_kwargs = dict(features_only=True, out_indices=out_indices, **timm_kwargs)
        if pretrained:
            source, cached = _pretrained_source(name)
            ensure_download_possible(f"timm model {name!r}", source, cached)
            with download_errors_explained(f"timm model {name!r}", source):
                self.body = timm.create_model(name, pretrained=True, **build_kwargs)
        else:
            self.body = timm.create_model(name, pretrained=False, **build_kwargs)

        self.grad_checkpointing = False
        info = self.body.feature_info
        self.feature_specs = [
            FeatureSpec(level_name(lvl), int(stride), int(ch))
            for lvl, stride, ch in zip(levels, info.reduction(), info.channels())
        ]
        if [s.level for s in self.feature_specs] != levels:  # timm ignored out_indices: never silently mislabel
            raise RuntimeError(f"timm returned features {self.feature_specs} for requested levels {levels}")

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.input_size is not None and tuple(images.shape[-2:]) != self.input_size:
            h, w = self.input_size
            raise ValueError(
                f"backbone {self.name} was built for {h}x{w} inputs (its relative-position attention tables are "
                f"sized at construction) but got {images.shape[-2]}x{images.shape[-1]} (after padding to a multiple "
                f"of 32); resize the inputs to {h}x{w}, or build the model for this size: "
                f"image_size=[{images.shape[-2]}, {images.shape[-1]}] (model.image_size=... on the command line)"
            )
        if self.grad_checkpointing and self.training:
            with full_recomputation():  # timm's own checkpoints (set_grad_checkpointing) recompute to the end
                feats = self.body(images)
        else:
            feats = self.body(images)
        return {spec.name: f for spec, f in zip(self.feature_specs, feats)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's own: every stage (EfficientNet ``blocks.N``; a features_only wrapper's modules but its first and
        last) is recomputed in the backward pass, non-reentrant."""
        if not hasattr(self.body, "set_grad_checkpointing"):
            raise NotImplementedError(f"timm's features_only {self.name} has no gradient checkpointing; use model.grad_checkpoint=false")
        self.grad_checkpointing = enable
        self.body.set_grad_checkpointing(enable and self.training)

    def train(self, mode: bool = True) -> TimmBackbone:
        """timm checkpoints whenever its flag is set; densekit only in training, so that evaluation, tracing and
        export of a model trained with ``model.grad_checkpoint`` run the plain forward."""
        super().train(mode)
        if self.grad_checkpointing:
            self.body.set_grad_checkpointing(mode)
        return self

    def layers_up_to_stride(self, stride: int) -> list[nn.Module]:
        """Every module that runs before the end of the last timm stage at a stride of at most ``stride``
        (timm's ``feature_info``: for EfficientNet, stride 4 is ``conv_stem``, ``bn1``, ``blocks.0`` and ``blocks.1``)."""
        stages = [info["module"] for info in self.body.feature_info.info if info["reduction"] <= stride]
        return _modules_through(self.body, stages[-1].split(".")) if stages else []

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load weights in any layout this backbone recognises, all-or-nothing.

        Layouts: densekit's own (``body.*``), a bare timm state_dict of the full model (``conv_stem.weight``...;
        classifier / head tensors that the features_only body lacks are ignored) and efficientnet_pytorch
        (``_conv_stem.weight``, ``_blocks.N.*``; converted onto this timm model's block structure).

        Raises:
            CheckpointError: naming ``source`` and the keys that do not fit; the backbone is left unchanged.
        """
        ignored: list[str] = []
        if is_efficientnet_pytorch_layout(state_dict):
            self._warn_if_not_tf_padded(source)
            state_dict = convert_efficientnet_pytorch(state_dict, self, source=source)
        elif not any(k.startswith("body.") for k in state_dict):
            state_dict, ignored = self._from_bare_timm(state_dict)
        if self.input_size is not None:
            state_dict = self._fit_rel_pos_tables(state_dict)
        try:
            load_state_dict_checked(self, state_dict, source)
        except CheckpointError as err:
            if not ignored:
                raise
            note = f"\n  ignored as not part of the features_only model ({len(ignored)}): {', '.join(ignored[:10])}"
            raise CheckpointError(f"{err}{note}") from None

    def _warn_if_not_tf_padded(self, source: str) -> None:
        """efficientnet_pytorch's weights are TensorFlow ports: they expect TF "same" padding (timm's ``tf_*``
        models). The shapes fit a symmetric-padding model just as well, so only a warning can tell."""
        from timm.layers import Conv2dSame

        if any(isinstance(m, Conv2dSame) for m in self.body.modules()):
            return
        arch = self.name.split(".", 1)[0]
        suggestion = f"tf_{arch}" if timm.is_model(f"tf_{arch}") else "the tf_ variant of this model"
        warnings.warn(
            f"{source} is in efficientnet_pytorch's layout (weights ported from TensorFlow, which expect TF 'same' "
            f"padding), but backbone {self.name} pads symmetrically: the padding differs, so features shift and "
            f"accuracy drops. Use {suggestion} (model.backbone.name={suggestion}).",
            UserWarning,
            stacklevel=3,
        )

    def _fit_rel_pos_tables(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Interpolate relative-position bias tables saved at another input size (e.g. timm's 224 px ImageNet
        weights) to this backbone's, as timm does when it loads pretrained weights at another ``img_size``."""
        from timm.layers import resize_rel_pos_bias_table

        own = self.state_dict()
        out = dict(state_dict)
        for key, value in state_dict.items():
            if key.endswith(_REL_POS_TABLE) and key in own and value.shape != own[key].shape:
                module = self.get_submodule(key[: -len(_REL_POS_TABLE) - 1])
                out[key] = resize_rel_pos_bias_table(value, new_window_size=module.window_size, new_bias_shape=own[key].shape)
        return out

    def _from_bare_timm(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Map a timm classifier state_dict onto ``body.*``; returns it and the head keys left out."""
        own = self.state_dict()
        own_roots = {k.split(".", 2)[1] for k in own}
        out: dict[str, torch.Tensor] = {}
        ignored: list[str] = []
        for key, value in state_dict.items():
            target = _timm_feature_key(key, own)
            if target is not None:
                out[target] = value
            elif key.split(".", 1)[0] not in own_roots:
                ignored.append(key)  # a module the features_only wrapper removed (classifier, conv_head, fc...)
            else:
                out["body." + key] = value  # part of the body but unknown there: reported as unexpected
        return out, ignored


def _modules_through(root: nn.Module, path: list[str]) -> list[nn.Module]:
    """The children of ``root`` before the module at ``path`` (timm's dotted name of a stage), and that module; a
    features_only wrapper may have flattened the name (``stages.0`` -> child ``stages_0``)."""
    children = list(root.named_children())
    names = [name for name, _ in children]
    for depth in range(len(path), 0, -1):  # the longest prefix of the path that names a child, flattened
        name = "_".join(path[:depth])
        if name in names:
            index = names.index(name)
            before = [module for _, module in children[:index]]
            if depth == len(path):
                return [*before, children[index][1]]
            return [*before, *_modules_through(children[index][1], path[depth:])]
    raise ValueError(f"no module {'.'.join(path)!r} under {type(root).__name__} (children: {names})")


def _timm_feature_key(key: str, own: Mapping[str, torch.Tensor]) -> str | None:
    """Where a full-model timm key lives in the features_only body, or None.

    ``FeatureListNet`` flattens nested module names (``stem.0`` -> ``stem_0``) and ``FeatureGetterNet`` nests
    the model under ``model.``, so besides the identity those spellings are tried.
    """
    parts = key.split(".")
    candidates = ["body." + key, "body.model." + key]
    candidates += ["body." + "_".join(parts[:i]) + "." + ".".join(parts[i:]) for i in range(2, len(parts))]
    return next((c for c in candidates if c in own), None)


def _pretrained_source(name: str) -> tuple[str, bool]:
    """Where timm would fetch ``name``'s weights from, and whether they are already cached locally.

    Mirrors timm's own choice: the Hugging Face hub if the config names a hub repo, else the config's URL.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(_current_name(name))
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ValueError(f"timm has no pretrained weights for {name!r}; use pretrained=False or weights=<file>")
    if cfg.file:
        return str(cfg.file), True
    if cfg.hf_hub_id:
        filenames = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
        return f"https://huggingface.co/{cfg.hf_hub_id}", hf_hub_cached(cfg.hf_hub_id, filenames)
    return str(cfg.url), torch_hub_cached(str(cfg.url))


def _build_timm(
    name: str,
    out_levels: Sequence[int] | None = None,
    pretrained: bool = False,
    image_size: Sequence[int] | int | None = None,
    **timm_kwargs: Any,
) -> TimmBackbone:
    """The timm family's builder: :class:`TimmBackbone` at levels (3, 4, 5) unless told otherwise."""
    levels = (3, 4, 5) if out_levels is None else out_levels
    return TimmBackbone(name, out_levels=levels, pretrained=pretrained, image_size=image_size, **timm_kwargs)


BACKBONE_FAMILIES.register("timm")(
    BackboneFamily(
        label="timm",
        matches=timm.is_model,
        build=_build_timm,
        backbone_type=TimmBackbone,
        list_names=lambda pattern, pretrained: list(timm.list_models(pattern, pretrained=pretrained)),
        hint="Any timm model with features_only support works; list them with densekit.list_backbones() or "
        "timm.list_models('pattern*').",
        options=("drop_path_rate",),
        fold_rules=timm_fold_rules,
    )
)
