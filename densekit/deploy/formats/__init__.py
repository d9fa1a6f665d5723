"""Deployment formats behind one seam: ``export_artifact(model, "openvino", ...)`` writes an artifact,
``load_artifact_model(path)`` runs it as a densekit model.

=========  ===========  =====================  ==================  ================================
format     artifact     runtime                precisions          notes
=========  ===========  =====================  ==================  ================================
onnx       ``.onnx``    onnxruntime (CPU)      fp32, int8 (NNCF)   any ONNX runtime can run it
openvino   ``.xml``     OpenVINO (CPU)         fp32, fp16, int8    int8: NNCF post-training
tensorrt   ``.engine``  TensorRT (CUDA)        fp32, fp16, int8    built on the GPU that runs it
=========  ===========  =====================  ==================  ================================

A new format is one module here: an :class:`~.base.ExportFormat` (``export`` and ``load``) registered in
:data:`FORMATS`. The runtimes are imported only when a format is used (``pip install 'densekit[deploy]'`` brings
onnxruntime, OpenVINO and NNCF; TensorRT comes with NVIDIA's wheels on CUDA machines).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from . import onnx_format, openvino_format, tensorrt_format  # noqa: F401  (register the formats)
from .artifact import ArtifactNetwork, artifact_of, format_of_path, is_artifact, load_artifact_model, load_runtime
from .base import FORMATS, PRECISIONS, ArtifactError, ArtifactInfo, ExportFormat, ExportRequest, Runtime

log = logging.getLogger(__name__)

__all__ = [
    "FORMATS", "ArtifactError", "ArtifactInfo", "ArtifactNetwork", "ExportFormat", "ExportRequest", "Runtime",
    "artifact_of", "convert_model", "export_artifact", "format_of_path", "is_artifact", "load_artifact_model", "load_runtime",
]


def export_artifact(
    model: nn.Module,
    format: str,
    output: str | os.PathLike,
    image_size: tuple[int, int],
    precision: str = "fp32",
    batch: int = 1,
    postprocess: bool = False,
    calibration: Any = None,
    calibration_images: int = 300,
    opset: int = 17,
) -> Path:
    """Write ``model`` (a densekit detector or segmenter) as a ``format`` artifact at ``output``.

    Args:
        model: The model; put in eval mode.
        format: A name in :data:`FORMATS` (``onnx``, ``openvino``, ``tensorrt``).
        output: The artifact file (``.onnx``, ``.xml`` with its ``.bin`` beside it, ``.engine``); its directory
            must exist. Written atomically.
        image_size: Input ``(H, W)`` of the graph.
        precision: ``fp32``, ``fp16`` or ``int8`` (see the format's ``precisions``).
        batch: Batch size of the graph.
        postprocess: Detection: decoding and NMS in the graph (for runtimes outside densekit; densekit runs and
            evaluates network-only artifacts).
        calibration: int8: calibration images (a dataset of ``(image, target)``, a loader, or tensors) at
            ``image_size``, e.g. :func:`densekit.deploy.quantize.calibration_set`.
        calibration_images: int8: how many of them to use.
        opset: ONNX opset of the graph every format starts from.

    Raises:
        ArtifactError: unknown format or precision, missing runtime, wrong suffix or output folder, calibration
            images that do not fit.
        densekit.deploy.onnx.ExportError: the model cannot be traced.
    """
    fmt = FORMATS.get(format)
    output = Path(output).expanduser()
    if precision not in fmt.precisions:
        raise ArtifactError(f"export.format={format} writes precisions {', '.join(fmt.precisions)}, not {precision!r}")
    if precision == "int8" and postprocess:  # every format quantises the network graph, never the NMS one
        raise ArtifactError("int8 export quantises the network alone: use export.postprocess=false")
    if output.suffix.lower() != fmt.suffix:
        raise ArtifactError(f"export.output={output}: an artifact of export.format={format} is a {fmt.suffix} file "
                            f"(e.g. {output.with_suffix(fmt.suffix).name})")
    if not output.parent.is_dir():
        raise ArtifactError(f"output directory {output.parent} does not exist")
    fmt.check_available()
    config = getattr(model, "config", None)
    if config is None:
        raise ArtifactError(f"cannot export {type(model).__name__}: expected a densekit model built from a config")
    model.eval()
    h, w = int(image_size[0]), int(image_size[1])
    model_cfg = OmegaConf.to_container(config, resolve=True)
    model_cfg["image_size"] = [h, w]  # the artifact's own input size: what a Predictor on it resizes to
    from ..onnx import export_output_names

    outputs = export_output_names(model, (h, w), postprocess)
    info = ArtifactInfo(format=format, precision=precision, model=model_cfg, image_size=(h, w), batch=int(batch),
                        outputs=outputs, postprocess=bool(postprocess),
                        extra={"calibration_images": int(calibration_images)} if precision == "int8" else {})
    request = ExportRequest(model, output, (h, w), int(batch), precision, bool(postprocess), calibration,
                            int(calibration_images), int(opset))
    path = fmt.export(request, info)
    log.info("wrote %s (%s %s)", path, format, precision)
    return path


def convert_model(model: nn.Module, format: str, image_size: tuple[int, int], batch: int = 1) -> nn.Module:
    """``model`` as a ``format`` artifact (fp32) running in its runtime, without keeping a file: what
    ``densekit.Predictor(..., backend="openvino")`` runs. The artifact is written to a temporary folder that lives
    as long as the returned model (``model.artifact``), loaded like any artifact, and checked to give ``model``'s
    outputs on one input.

    Raises:
        ArtifactError: the format is unknown or not installed, or the converted model disagrees with ``model``.
    """
    from .artifact import compare_outputs

    fmt = FORMATS.get(format)
    folder = tempfile.TemporaryDirectory(prefix="densekit-")
    path = export_artifact(model, format, Path(folder.name) / f"model{fmt.suffix}", image_size, batch=batch)
    converted = load_artifact_model(path)
    converted.artifact.folder = folder  # removed when the converted model is
    images = torch.rand(batch, 3, *image_size, generator=torch.Generator().manual_seed(0))
    gap = compare_outputs(model, converted, images.to(next(model.parameters()).device))
    if gap["max_abs"] > 1e-3 * max(gap["scale"], 1.0):
        raise ArtifactError(f"{format} conversion of {model.config.name} differs from PyTorch by {gap['max_abs']:.3g} "
                            f"(outputs up to {gap['scale']:.3g}); run it with backend='torch'")
    return converted
