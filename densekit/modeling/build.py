"""Building models from ``conf/model`` entries: the Python twin of what Hydra composes for the tools.

A model YAML names its architecture once, through the schema in its defaults list (``defaults:
[_segmenter_schema, _self_]``); the schema's ``arch`` field carries the same name into the resolved config, and
:data:`~densekit.modeling.registry.META_ARCHS` maps it to the builder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

# The meta-architecture modules register themselves (schema + builder) in META_ARCHS on import.
from . import detector, segmenter  # noqa: F401
from .backbones import use_weights_normalization
from .model_spec import model_spec
from .registry import META_ARCHS

#: The architecture of a config that does not say (a partial dict handed to :func:`build_model`).
DEFAULT_ARCH = "efficientdet"
_SCHEMA_PREFIX, _SCHEMA_SUFFIX = "_", "_schema"


def schema_node(arch: str) -> str:
    """The Hydra ConfigStore name of ``arch``'s schema, as model YAMLs list it in their defaults."""
    return f"{_SCHEMA_PREFIX}{arch}{_SCHEMA_SUFFIX}"


def arch_of_yaml(raw: DictConfig, source: str) -> str:
    """The architecture a model YAML names through the schema in its ``defaults`` list."""
    for entry in raw.get("defaults") or []:
        if isinstance(entry, str) and entry.startswith(_SCHEMA_PREFIX) and entry.endswith(_SCHEMA_SUFFIX):
            return entry[len(_SCHEMA_PREFIX) : -len(_SCHEMA_SUFFIX)]
    known = ", ".join(schema_node(a) for a in META_ARCHS)
    raise ValueError(f"{source}: its defaults list names no model schema (one of {known})")


def resolve_model_config(cfg: Any, source: str = "model config", arch: str | None = None) -> DictConfig:
    """Merge a model config (dict / DictConfig) onto its architecture's schema.

    Args:
        cfg: The config; its ``arch`` key (or ``arch``, or :data:`DEFAULT_ARCH`) picks the schema.
        source: What the config came from, quoted in errors.
        arch: The architecture, when the caller knows it from elsewhere (a YAML's defaults list).

    A backbone name that selects timm weights by tag (``tf_efficientnet_b0.ap_in1k``) brings their normalisation
    when the config keeps the schema's ImageNet one (:func:`~densekit.modeling.backbones.use_weights_normalization`).

    Raises:
        ValueError: unknown architecture, unknown key or wrong type, naming the key and ``source``.
    """
    arch = arch or (cfg.get("arch") if hasattr(cfg, "get") else None) or DEFAULT_ARCH
    try:
        schema = META_ARCHS.get(arch).schema
        resolved = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except (ValueError, OmegaConfBaseException) as err:
        raise ValueError(f"{source}: {err}") from None
    use_weights_normalization(resolved)  # e.g. AdvProp's `_ap` weights take inputs in [-1, 1]
    return resolved


#: The environment variable naming a folder of the user's own config YAMLs (:func:`user_config_dir`).
CONF_ENV = "DENSEKIT_CONF"


def config_dir() -> Path:
    """densekit's own config tree, ``densekit/conf``: package data of the wheel (a checkout links it as ``conf/``)."""
    path = Path(__file__).resolve().parents[1] / "conf"
    if not (path / "model").is_dir():
        raise FileNotFoundError(f"densekit's config tree is missing at {path}: an incomplete installation; "
                                "reinstall densekit")
    return path


def user_config_dir() -> Path | None:
    """``$DENSEKIT_CONF``, a folder of the user's own YAMLs laid out as densekit's (``model/``, ``data/``,
    ``train/``, ...), looked in before densekit's own; None when the variable is unset or empty.

    Raises:
        FileNotFoundError: the variable names no folder (a typo would otherwise hide the user's configs silently).
    """
    value = os.environ.get(CONF_ENV)
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{CONF_ENV}={value}: no such folder\n{CONF_ENV} names a folder of your own config YAMLs, laid out as "
            f"densekit's conf/ (model/, data/, train/, ...), which are added to densekit's; create it or unset "
            f"{CONF_ENV}"
        )
    return path


def config_dirs() -> list[Path]:
    """Where config YAMLs are looked up, first match first: the user's folder (:func:`user_config_dir`), then
    densekit's (:func:`config_dir`). The Hydra tools search the same folders in the same order
    (:mod:`densekit.cli.user_conf`)."""
    user = user_config_dir()
    return [*([user] if user is not None else []), config_dir()]


def _model_files() -> dict[str, Path]:
    """Model name -> its YAML in :func:`config_dirs`; a user's file shadows densekit's of the same name."""
    files: dict[str, Path] = {}
    for folder in reversed(config_dirs()):  # densekit's first, so that the user's overwrite them
        files.update({p.stem: p for p in (folder / "model").glob("*.yaml") if not p.stem.startswith("_")})
    return files


def list_models(arch: str | None = None) -> list[str]:
    """Names accepted by :func:`create_model`: the files in ``conf/model``, and in ``$DENSEKIT_CONF/model``.

    Args:
        arch: Only models of this architecture (``"efficientdet"``, ``"segmenter"``); ``None`` lists all.
    """
    files = _model_files()
    names = sorted(files)
    if arch is None:
        return names
    # Reading the files' defaults lists costs milliseconds.
    return [n for n in names if arch_of_yaml(OmegaConf.load(files[n]), n) == arch]


def load_model_config(name: str, **overrides: Any) -> DictConfig:
    """The resolved config of ``conf/model/<name>.yaml`` (``$DENSEKIT_CONF/model/<name>.yaml`` first) with
    ``overrides`` (nested dicts) merged on top."""
    files = _model_files()
    if name not in files:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(files))}")
    path = files[name]
    raw = OmegaConf.load(path)
    arch = arch_of_yaml(raw, str(path))
    raw.pop("defaults")  # Hydra's pointer to the schema, which resolve_model_config applies itself
    cfg = OmegaConf.merge(raw, OmegaConf.create(overrides))
    return resolve_model_config(cfg, source=str(path), arch=arch)


def build_model(cfg: Any) -> nn.Module:
    """Build a model from a (possibly partial) model config, e.g. Hydra's ``cfg.model``; ``model.config`` is the
    resolved config."""
    cfg = resolve_model_config(cfg)
    model = META_ARCHS.get(cfg.arch).build(cfg)
    if cfg.grad_checkpoint:
        model.set_grad_checkpointing(True)
    return model


def create_model(name: str, num_classes: int | None = None, weights: str | os.PathLike | None = None, **overrides: Any) -> nn.Module:
    """Build any ``conf/model`` entry by name.

    Args:
        name: Model name, e.g. ``"efficientdet_d0"``; :func:`list_models` lists them.
        num_classes: Replace the config's (or the weights') class count. With ``weights`` of another class count
            this fine-tunes: every tensor but the class predictor loads, and the predictor keeps the rows of
            classes named in both (``class_names=[...]``; see :func:`densekit.checkpoint.finetune.load_for_finetuning`).
        weights: A checkpoint to load: densekit's own, an efficientdet-pytorch or a torchvision LR-ASPP state_dict,
            a zoo name such as ``"zoo:tf_efficientdet_d0"`` (downloaded once, see :func:`densekit.list_weights`),
            or (for the backbone alone, via ``backbone={"weights": ...}``) EfficientNet / MobileNetV3 weights.
            What the weights know of their model (a densekit run's class count and names, a zoo entry's config
            keys) is applied unless ``num_classes`` / ``overrides`` say otherwise.
        **overrides: Config overrides as nested dicts, e.g. ``neck={"repeats": 1}``, ``image_size=[256, 256]``.
    """
    spec = model_spec(name, weights, **overrides)  # reads the weights first: a bad file fails before the build
    if num_classes is not None:  # asked for a class count: fine-tune (only the class predictor may start over)
        spec = spec.with_classes(num_classes, overrides.get("class_names"))
    return spec.build()
