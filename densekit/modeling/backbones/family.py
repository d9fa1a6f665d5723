"""Backbone families: the libraries a backbone name can come from, each with what only it knows.

A family (torchvision's MobileNetV3, timm) registers in :data:`BACKBONE_FAMILIES` where its backbone class is
defined: how it recognises its names, the backbone config keys only it understands, its builder, and how its blocks
fold their BatchNorms into convolutions for inference (:func:`densekit.deploy.optimize.fold_batchnorm`).
:func:`~densekit.modeling.backbones.create_backbone` and ``build_backbone`` ask the family instead of comparing names,
so another library is one new module that registers its family.

efficientnet_pytorch is no family: it names no backbones, its checkpoints are a weight layout that timm's
EfficientNets load (:mod:`.efficientnet_pytorch`).
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import ListConfig
from torch import nn

from ...config import BackboneConfig
from ..registry import Registry
from .base import Backbone


@dataclass(frozen=True)
class BlockFolding:
    """How one block's BatchNorms fold into its convolutions.

    Attributes:
        pairs: ``(conv, bn)`` child names whose BN the block's ``forward`` applies right after the conv, with
            nothing in between; only these are folded (module registration order says nothing about ``forward``).
        kept: ``(bn, reason)``: BNs of the block that stay unfolded on purpose, e.g. a pre-norm that no conv precedes.
    """

    pairs: tuple[tuple[str, str], ...] = ()
    kept: tuple[tuple[str, str], ...] = ()


#: A family's folding rules: the :class:`BlockFolding` of one of its blocks, None for a module it does not define.
FoldRules = Callable[[nn.Module], "BlockFolding | None"]


def no_block_rules(module: nn.Module) -> BlockFolding | None:
    """The rules of a family whose conv + BN pairs are all ``nn.Sequential`` neighbours, which fold by structure."""
    return None


@dataclass(frozen=True)
class BackboneFamily:
    """One library's backbones.

    Attributes:
        label: The family in messages (``"MobileNetV3"``, ``"timm"``).
        matches: Whether a backbone name belongs to this family.
        build: ``build(name, out_levels=, pretrained=, image_size=, **options) -> Backbone``; ``out_levels`` None
            means the family's default levels, ``image_size`` is for the backbones that are built for one size.
        backbone_type: The :class:`Backbone` subclass it builds (how folding finds a built backbone's family).
        list_names: ``list_names(pattern, pretrained)``: its names matching a shell-style pattern.
        hint: What the unknown-name message says about this family's names.
        options: The backbone config keys this family's builder reads, beyond ``name``, ``out_levels``,
            ``weights`` and ``pretrained``. Those that are not in every backbone config (:data:`SHARED_KEYS`) are
            refused, when set, on another family's backbone.
        fold_rules: How its blocks fold their BatchNorms (:data:`FoldRules`).
    """

    label: str
    matches: Callable[[str], bool]
    build: Callable[..., Backbone]
    backbone_type: type[Backbone]
    list_names: Callable[[str, bool], list[str]]
    hint: str
    options: tuple[str, ...] = ()
    fold_rules: FoldRules = no_block_rules


#: Keys every backbone config carries (the schema's :class:`~densekit.config.BackboneConfig`, e.g. ``drop_path_rate``
#: with its default): a family reads those it understands and ignores the others, which are never refused.
SHARED_KEYS = frozenset(f.name for f in fields(BackboneConfig))

#: Backbone families in registration order, which is the order of :func:`list_backbones` and of the unknown-name hints.
BACKBONE_FAMILIES: Registry[BackboneFamily] = Registry("backbone family", "backbone.name", unique=("backbone_type",))


def family_of(name: str) -> BackboneFamily:
    """The family of backbone ``name``.

    Raises:
        ValueError: no family knows the name (the message lists close matches and where names come from).
        RuntimeError: more than one family claims it, a registration bug (names must not depend on import order).
    """
    found = [(key, family) for key, family in BACKBONE_FAMILIES.items() if family.matches(name)]
    if not found:
        raise ValueError(unknown_backbone_message(name))
    if len(found) > 1:
        raise RuntimeError(f"backbone {name!r} is claimed by several families: {', '.join(key for key, _ in found)}")
    return found[0][1]


def family_of_backbone(module: nn.Module) -> BackboneFamily | None:
    """The family that built ``module`` (the one of its most derived registered class), or None when no family did."""
    found = (BACKBONE_FAMILIES.find("backbone_type", cls) for cls in type(module).__mro__)
    return next((family for family in found if family is not None), None)


def family_options(family: BackboneFamily, cfg: Any) -> dict[str, Any]:
    """The options of ``family`` a backbone config sets (lists as tuples), refusing another family's options.

    Args:
        family: The family of ``cfg.name``.
        cfg: A backbone config node (:class:`densekit.config.BackboneConfig` or a subclass); missing keys are unset.

    Raises:
        ValueError: ``cfg`` sets (to a true value) an option only another family reads; the message names that
            family and its options, and this family's.
    """
    for other in BACKBONE_FAMILIES.values():
        foreign = [k for k in other.options if k not in family.options and k not in SHARED_KEYS and cfg.get(k)]
        if other is not family and foreign:
            raise ValueError(
                f"backbone.{foreign[0]} is a {other.label} option (for {_names_of(other)}; {other.label} options: "
                f"{', '.join(other.options)}), not for {cfg.name!r}, a {family.label} backbone (its options: "
                f"{', '.join(family.options) or 'none'})"
            )
    return {key: _plain(cfg.get(key)) for key in family.options if cfg.get(key) is not None}


def _names_of(family: BackboneFamily, most: int = 8) -> str:
    """A family's backbone names for a message, or ``any <label> model`` when there are too many to list."""
    names = family.list_names("*", False)
    return ", ".join(names) if len(names) <= most else f"any {family.label} model"


def _plain(value: Any) -> Any:
    """A config list as a tuple (backbones keep their options; an OmegaConf node would tie them to the config)."""
    return tuple(value) if isinstance(value, (ListConfig, list)) else value


def list_backbone_names(pattern: str, pretrained: bool) -> list[str]:
    """Every family's names matching ``pattern``, family by family in registration order."""
    return [name for family in BACKBONE_FAMILIES.values() for name in family.list_names(pattern, pretrained)]


def unknown_backbone_message(name: str) -> str:
    """Error text for a backbone name no family knows, with the closest known names and each family's hint."""
    arch = name.split(".", 1)[0]  # "resnet50.a1_in1k" -> match on the architecture
    close = closest(arch, list_backbone_names("*", False))
    hint = f" Closest matches: {', '.join(close)}." if close else ""
    return f"unknown backbone {name!r}.{hint} {' '.join(f.hint for f in BACKBONE_FAMILIES.values())}"


def closest(name: str, candidates: list[str], n: int = 6, cutoff: float = 0.6) -> list[str]:
    """Like ``difflib.get_close_matches`` but case-insensitive, and ties go alphabetically (b0 before b8)."""
    matcher = difflib.SequenceMatcher()
    matcher.set_seq2(name.lower())
    scored = []
    for cand in candidates:
        matcher.set_seq1(cand.lower())
        # The cheap upper bounds first, as difflib.get_close_matches does: ~1300 timm names stay instant.
        if matcher.real_quick_ratio() >= cutoff and matcher.quick_ratio() >= cutoff:
            if (ratio := matcher.ratio()) >= cutoff:
                scored.append((-ratio, cand))
    return [cand for _, cand in sorted(scored)[:n]]
