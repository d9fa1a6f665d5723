"""Name -> builder tables for the parts a model config names: meta-architectures, necks and heads.

A part registers itself where it is defined (``@SEG_HEADS.register("lraspp")`` in ``heads/lraspp.py``), so a new
head or neck touches one file; configs refer to it by that name (``head.type``, ``neck.type``, the model's
schema). Lookups fail with the list of known names.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of ``T`` (builders, usually) filled by :meth:`register`.

    Args:
        kind: What the entries are, for error messages (``"segmentation head type"``).
        config_key: The config key that selects an entry (``"head.type"``), for error messages.
    """

    def __init__(self, kind: str, config_key: str) -> None:
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: store the decorated object under ``name`` (each name once)."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The entry called ``name``; raises ``ValueError`` naming the config key and the known names."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(sorted(self))} ({self.config_key})")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


@dataclass(frozen=True)
class MetaArch:
    """A meta-architecture: its config schema (a dataclass) and the builder from a resolved config to a model."""

    schema: type
    build: Callable[[Any], Any]


#: Meta-architectures by the name their schema registers under Hydra (``_<name>_schema``, see config.py).
META_ARCHS: Registry[MetaArch] = Registry("arch", "model arch")
#: Necks: ``build(cfg, backbone) -> nn.Module`` with the neck's output channels in ``out_channels``.
NECKS: Registry[Callable[..., Any]] = Registry("neck type", "neck.type")
#: Segmentation heads: ``build(cfg, in_channels: list[int]) -> nn.Module`` with ``num_classes``.
SEG_HEADS: Registry[Callable[..., Any]] = Registry("segmentation head type", "head.type")
