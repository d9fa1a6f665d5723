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
        unique: Attributes of the entries that no two entries may share: a value, or each item of a tuple value
            (a task's ``data_formats``). Lookups by such an attribute would otherwise let the later entry silently
            replace the earlier one.
    """

    def __init__(self, kind: str, config_key: str, unique: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.config_key = config_key
        self.unique = unique
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: store the decorated object under ``name`` (each name once, each :attr:`unique` value once)."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._refuse_shared_values(name, obj)
            self._entries[name] = obj
            return obj

        return add

    def _refuse_shared_values(self, name: str, obj: T) -> None:
        """Raise ``KeyError`` naming both entries when ``obj`` has a :attr:`unique` value an entry already has."""
        for attr in self.unique:
            for other_name, other in self._entries.items():
                shared = sorted(map(repr, _values(getattr(obj, attr)) & _values(getattr(other, attr))))
                if shared:
                    raise KeyError(
                        f"{self.kind} {name!r} cannot be registered: {self.kind} {other_name!r} already serves "
                        f"{attr} {', '.join(shared)}"
                    )

    def find(self, attr: str, value: object) -> T | None:
        """The entry whose ``attr`` is (or, for a tuple, holds) ``value``, None if none (for :attr:`unique` ones)."""
        return next((obj for obj in self._entries.values() if value in _values(getattr(obj, attr))), None)

    def values(self) -> list[T]:
        """The entries, in registration order."""
        return list(self._entries.values())

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs, in registration order."""
        return list(self._entries.items())

    def get(self, name: str) -> T:
        """The entry called ``name``; raises ``ValueError`` naming the config key and the known names."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(sorted(self))} ({self.config_key})")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


def _values(value: object) -> set[object]:
    """A :attr:`Registry.unique` attribute's values: the items of a tuple / list / set, else the value itself."""
    return set(value) if isinstance(value, (tuple, list, set, frozenset)) else {value}


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
