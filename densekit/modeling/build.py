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
from ..checkpoint.convert import load_state_dict_any
from ..checkpoint.finetune import load_for_finetuning
from ..checkpoint.weights import read_model_weights
from .backbones import use_weights_normalization
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


def config_dir() -> Path:
    """The ``conf/`` tree: ``$DENSEKIT_CONF`` or the one beside the package (editable install / source checkout)."""
    path = Path(os.environ.get("DENSEKIT_CONF", Path(__file__).resolve().parents[2] / "conf"))
    if not (path / "model").is_dir():
        raise FileNotFoundError(f"densekit config tree not found at {path}; set DENSEKIT_CONF to the repo's conf/ directory")
    return path


def list_models(arch: str | None = None) -> list[str]:
    """Names accepted by :func:`create_model` (the files in ``conf/model``).

    Args:
        arch: Only models of this architecture (``"efficientdet"``, ``"segmenter"``); ``None`` lists all.
    """
    model_dir = config_dir() / "model"
    names = sorted(p.stem for p in model_dir.glob("*.yaml") if not p.stem.startswith("_"))
    if arch is None:
        return names
    # Reading the files' defaults lists costs milliseconds.
    return [n for n in names if arch_of_yaml(OmegaConf.load(model_dir / f"{n}.yaml"), n) == arch]


def load_model_config(name: str, **overrides: Any) -> DictConfig:
    """The resolved config of ``conf/model/<name>.yaml`` with ``overrides`` (nested dicts) merged on top."""
    path = config_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
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
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if weights is None:
        return build_model(load_model_config(name, **overrides))
    read = read_model_weights(weights)  # read first: a missing file or failed download fails before the build
    model = build_model(load_model_config(name, **_under(overrides, read.model_overrides)))
    if num_classes is not None:  # asked for a class count: fine-tune (only the class predictor may start over)
        load_for_finetuning(model, read)
    else:
        load_state_dict_any(model, read.state_dict, read.source)
    return model


def build_with_weights(model_cfg: Any, weights: str | os.PathLike, prefer_ema: bool = False) -> tuple[nn.Module, str]:
    """The model of ``model_cfg`` as the checkpoint ``weights`` records it (a densekit run's class count and names,
    a zoo entry's config keys), loaded all-or-nothing: what tools/eval.py, tools/export.py and the Predictor run.
    Returns the model and a description of the weights for messages (e.g. ``"EMA weights of run/last.pth"``).

    ``weights`` may also be an exported artifact (``.onnx``, ``.xml``, ``.engine``): the model then runs it
    (:func:`densekit.deploy.formats.load_artifact_model`; it must be an artifact of ``model_cfg``'s model)."""
    from ..deploy.formats import FORMATS, is_artifact, load_artifact_model  # late: deploy imports modeling

    if is_artifact(weights):
        model = load_artifact_model(weights, expected=model_cfg)
        info = model.artifact.info
        return model, f"{FORMATS.get(info.format).runtime_name} {info.precision} artifact {weights}"
    found = read_model_weights(weights, prefer_ema=prefer_ema)
    model = build_model(OmegaConf.merge(model_cfg, found.model_overrides))
    load_state_dict_any(model, found.state_dict, found.source)
    return model, found.source


def _under(overrides: dict[str, Any], recorded: dict[str, Any]) -> dict[str, Any]:
    """``recorded`` (what the weights know) with the caller's ``overrides`` on top; recorded class names are dropped
    when the caller sets another class count (they would name the wrong labels)."""
    recorded = dict(recorded)
    if "num_classes" in overrides and overrides["num_classes"] != recorded.get("num_classes"):
        recorded.pop("class_names", None)
    return OmegaConf.to_container(OmegaConf.merge(recorded, overrides))
