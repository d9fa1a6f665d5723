"""From a model config and a ``weights=`` value to a ready model: the one path every tool, the
:class:`~densekit.Predictor` and :func:`~densekit.create_model` take.

:func:`model_spec` finishes the model config once, in this order, and reads the weights once:

1. the config as given (a ``conf/model`` name, or a tool's ``cfg.model``), merged onto its architecture's schema;
2. what the weights record about their model: a densekit run's class count and names, a zoo entry's classes and
   architecture keys (e.g. the AdvProp ``_ap`` weights' ``pixel_mean`` / ``pixel_std`` of 0.5, inputs in [-1, 1]);
3. the caller's overrides on top (a recorded class list is dropped when the caller sets another class count);
4. the normalisation of backbone weights selected by name (``tf_efficientnet_b0.ap_in1k``).

The result, :attr:`ModelSpec.config`, is what datasets, transforms (the padding fill normalises to zero with the
model's own ``pixel_mean``), loaders and evaluators are built from. A training run then gives the spec its dataset's
classes (:meth:`ModelSpec.with_classes`: the weights fine-tune, only the class predictor may start over) and
:meth:`ModelSpec.build` builds and loads the model: all-or-nothing, or fine-tuning after ``with_classes``.

Backbone weights (one story): a full-model ``weights=`` checkpoint holds the backbone too and wins over everything
else; without one, ``model.backbone.weights=<file>`` loads a backbone checkpoint and ``model.backbone.pretrained=true``
downloads the library's ImageNet weights while the model is built (both are model config, so they are recorded and
resumable); ``train.backbone_weights=auto`` (tools/train.py's default) loads the ImageNet weights an installed
package ships for that backbone when neither is set.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..checkpoint.convert import load_state_dict_any
from ..checkpoint.finetune import load_for_finetuning
from ..checkpoint.weights import ModelWeights, read_model_weights

__all__ = ["ModelSpec", "finish_run_config", "model_spec"]


@dataclass(frozen=True)
class ModelSpec:
    """A finished model config and the weights it loads, read once.

    Attributes:
        config: The resolved model config (see the module docstring for what went into it).
        weights: The ``weights=`` checkpoint, read; ``None`` for freshly initialised weights.
        finetune: Whether :meth:`build` fine-tunes (classes set by :meth:`with_classes`) rather than loading
            all-or-nothing.
        prebuilt: An exported artifact's model (its weights live in the artifact, loaded by :func:`model_spec`).
        prebuilt_source: What :attr:`prebuilt` runs, for messages.
    """

    config: DictConfig
    weights: ModelWeights | None = None
    finetune: bool = False
    prebuilt: nn.Module | None = None
    prebuilt_source: str = ""

    @property
    def description(self) -> str:
        """Where the weights come from, for messages (``"EMA weights of run/checkpoints/last.pth"``)."""
        if self.prebuilt is not None:
            return self.prebuilt_source
        return self.weights.source if self.weights is not None else "random weights"

    def with_classes(self, num_classes: int, class_names: Sequence[str] | None = None) -> ModelSpec:
        """The spec for another class count / names (a dataset's, the caller's); the weights then fine-tune: every
        tensor but the class predictor loads, which keeps the rows of classes named in both."""
        if self.prebuilt is not None:
            raise ValueError(f"{self.description} is an exported artifact: its classes are fixed at export")
        same = num_classes == self.config.num_classes
        names = list(class_names) if class_names is not None else (self.config.class_names if same else None)
        config = _resolve(OmegaConf.merge(self.config, {"num_classes": num_classes, "class_names": names}))
        return replace(self, config=config, finetune=True)

    def build(self) -> nn.Module:
        """The model of :attr:`config` with :attr:`weights` loaded."""
        from .build import build_model  # late: build imports this module for create_model

        if self.prebuilt is not None:
            return self.prebuilt
        model = build_model(self.config)
        if self.weights is None:
            return model
        if self.finetune:
            load_for_finetuning(model, self.weights)
        else:
            load_state_dict_any(model, self.weights.state_dict, self.weights.source)
        return model


def model_spec(
    model: str | Mapping[str, Any] | DictConfig,
    weights: str | os.PathLike | None = None,
    prefer_ema: bool = False,
    **overrides: Any,
) -> ModelSpec:
    """Finish a model config and read its weights (see the module docstring).

    Args:
        model: A ``conf/model`` name (``"efficientdet_d0"``) or a (partial) model config such as a tool's
            ``cfg.model``.
        weights: A checkpoint (densekit's own, efficientdet-pytorch, torchvision LR-ASPP), ``"zoo:<name>"``, or an
            exported artifact (``.onnx`` / ``.xml`` / ``.engine``, which must be of ``model``); ``None``: none.
        prefer_ema: Take a training checkpoint's EMA weights (what evaluation scores).
        **overrides: Config keys (nested dicts) on top of what the weights record, e.g. ``num_classes=3``.

    Raises:
        CheckpointError: the weights cannot be read (the message names the file or zoo entry).
        ArtifactError: an artifact of another model, or unreadable.
        ValueError: unknown model name, config key or value.
    """
    from ..deploy.formats import FORMATS, is_artifact, load_artifact_model  # late: deploy imports modeling
    from .build import load_model_config, resolve_model_config  # late: build imports this module for create_model

    if weights is not None and is_artifact(weights):
        if overrides:
            raise ValueError(f"{os.fspath(weights)} is an exported artifact: its config is fixed at export, drop "
                             f"the overrides {sorted(overrides)}")
        built = load_artifact_model(weights, expected={"name": model} if isinstance(model, str) else model)
        info = built.artifact.info
        source = f"{FORMATS.get(info.format).runtime_name} {info.precision} artifact {os.fspath(weights)}"
        return ModelSpec(config=built.config, prebuilt=built, prebuilt_source=source)
    read = read_model_weights(weights, prefer_ema=prefer_ema) if weights is not None else None
    keys = _caller_over_recorded(overrides, read.model_overrides if read is not None else {})
    if isinstance(model, str):  # the YAML with the keys merged before the schema: errors name the file and key
        return ModelSpec(config=load_model_config(model, **keys), weights=read)
    given = model if isinstance(model, DictConfig) else OmegaConf.create(dict(model))
    return ModelSpec(config=resolve_model_config(OmegaConf.merge(given, keys)), weights=read)


def finish_run_config(cfg: DictConfig, prefer_ema: bool = False) -> ModelSpec:
    """:func:`model_spec` of a tool's ``cfg.model`` and ``cfg.weights``, with ``cfg.model`` replaced by the finished
    config, so that the datasets, loaders and evaluators built from ``cfg`` afterwards see it."""
    spec = model_spec(cfg.model, cfg.weights or None, prefer_ema=prefer_ema)
    cfg.model = spec.config
    return spec


def _resolve(cfg: Any) -> DictConfig:
    from .build import resolve_model_config  # late: build imports this module for create_model

    return resolve_model_config(cfg)


def _caller_over_recorded(overrides: Mapping[str, Any], recorded: Mapping[str, Any]) -> dict[str, Any]:
    """``recorded`` (what the weights know) with the caller's ``overrides`` on top; recorded class names are dropped
    when the caller sets another class count (they would name the wrong labels)."""
    recorded = dict(recorded)
    if "num_classes" in overrides and overrides["num_classes"] != recorded.get("num_classes"):
        recorded.pop("class_names", None)
    return OmegaConf.to_container(OmegaConf.merge(recorded, dict(overrides)))
