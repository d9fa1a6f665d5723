"""What every deployment format shares: the request an exporter gets, the metadata an artifact carries, the runtime
interface, and the registry the formats fill.

An *artifact* is what an exporter writes (``model.onnx``, ``model.xml`` + ``model.bin``, ``model.engine``). It takes
``images``: float ``[B, 3, H, W]`` RGB in [0, 1] at a fixed batch and size (normalisation and padding are in the
graph) and returns the network's raw outputs in the order of :attr:`ArtifactInfo.outputs`. It carries an
:class:`ArtifactInfo` (JSON): the resolved model config (classes, anchors, post-processing settings), the input size
and batch, the precision and the output names, so that loading it needs nothing else
(:func:`densekit.deploy.formats.load_artifact_model`).
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...modeling.registry import Registry

#: Key under which the metadata JSON is stored in an artifact (ONNX ``metadata_props``, OpenVINO ``rt_info``).
METADATA_KEY = "densekit"
#: Version of the metadata layout; a reader refuses a newer one instead of misreading it.
METADATA_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")


class ArtifactError(ValueError):
    """An artifact that cannot be written, read or run as asked; the message names the file."""


@dataclass
class ArtifactInfo:
    """What an artifact is: enough to rebuild its pre- and post-processing and to refuse a wrong input."""

    format: str
    precision: str
    model: dict[str, Any]             # the resolved model config (OmegaConf container), class names included
    image_size: tuple[int, int]       # (H, W) of the graph's input
    batch: int                        # batch size of the graph's input
    outputs: list[str]                # output names, in the order the runtime returns them
    postprocess: bool = False         # detection: NMS in the graph (boxes, scores, labels, num_detections)
    extra: dict[str, Any] = field(default_factory=dict)  # format specifics (calibration size, builder flags...)
    version: int = METADATA_VERSION

    @property
    def model_name(self) -> str:
        return str(self.model.get("name", "?"))

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "image_size": list(self.image_size)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: Path) -> ArtifactInfo:
        """Parse the metadata of ``source``; a missing key or a newer layout is an :class:`ArtifactError`."""
        try:
            raw = json.loads(text)
            if int(raw.get("version", 0)) > METADATA_VERSION:
                raise ArtifactError(f"{source} was written by a newer densekit (metadata version {raw['version']}); "
                                    "upgrade densekit to load it")
            raw["image_size"] = tuple(int(v) for v in raw["image_size"])
            return cls(**raw)
        except ArtifactError:
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise ArtifactError(f"{source}: unreadable densekit metadata ({type(err).__name__}: {err})") from err

    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 3, *self.image_size)


@dataclass
class ExportRequest:
    """One export: the model (eval mode) and how to write it."""

    model: nn.Module
    output: Path
    image_size: tuple[int, int]
    batch: int = 1
    precision: str = "fp32"
    postprocess: bool = False
    #: int8: the calibration images (a dataset of ``(image, target)`` pairs, a loader, or ``[B, 3, H, W]`` tensors).
    calibration: Any = None
    calibration_images: int = 300
    opset: int = 17

    def fp32_onnx(self) -> bytes:
        """The fp32 ONNX graph every format starts from (:func:`densekit.deploy.onnx.onnx_model_bytes`)."""
        from ..onnx import onnx_model_bytes

        return onnx_model_bytes(self.model, self.image_size, self.batch, self.opset, self.postprocess)


class Runtime(ABC):
    """A loaded artifact: ``run(images)`` takes the graph's input and returns its outputs, as torch tensors.

    Subclasses load in ``__init__`` and raise :class:`ArtifactError` naming the file when it cannot be read.
    """

    #: Where the runtime wants its inputs (tensors on another device are moved by the caller).
    device = torch.device("cpu")

    def __init__(self, path: Path, info: ArtifactInfo) -> None:
        self.path = path
        self.info = info

    @abstractmethod
    def run(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images`` exactly :meth:`ArtifactInfo.input_shape` (float32, contiguous, on :attr:`device`) -> the
        outputs in :attr:`ArtifactInfo.outputs` order (tensors that stay valid after the next call)."""


class ExportFormat(ABC):
    """A deployment format: how to write an artifact and which runtime loads it."""

    #: Registry name, the value of ``export.format``.
    name: str
    #: File suffix of the artifact (the file a user passes as ``weights=``).
    suffix: str
    #: The library that runs it, for messages and benchmark rows.
    runtime_name: str
    #: ``export.precision`` values this format writes.
    precisions: tuple[str, ...]

    @abstractmethod
    def missing(self) -> str | None:
        """Why this format cannot be used here (a package or CUDA missing, with the fix), or ``None``."""

    @abstractmethod
    def export(self, request: ExportRequest, info: ArtifactInfo) -> Path:
        """Write ``request.model`` as an artifact carrying ``info`` at ``request.output`` (atomically: an
        interrupted export leaves no file under that name); returns the path."""

    @abstractmethod
    def load(self, path: Path) -> Runtime:
        """The runtime of the artifact at ``path``."""

    def check_available(self) -> None:
        reason = self.missing()
        if reason:
            raise ArtifactError(f"export.format={self.name} is not available here: {reason}")


def missing_modules(*names: str) -> str | None:
    """``None`` when every module can be imported, else what to install (for :meth:`ExportFormat.missing`)."""
    import importlib.util

    absent = [name for name in names if importlib.util.find_spec(name) is None]
    return f"{', '.join(absent)} not installed (pip install 'densekit[deploy]')" if absent else None


#: Deployment formats by name (``export.format``); each format module registers an instance.
FORMATS: Registry[ExportFormat] = Registry("export format", "export.format")
