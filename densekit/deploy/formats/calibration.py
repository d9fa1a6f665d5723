"""int8 artifacts: calibration inputs at the artifact's shape and NNCF post-training quantisation of the fp32 graph.

Both CPU formats quantise the same way: the fp32 graph is exported first, then NNCF inserts quantise / dequantise
pairs calibrated on real images (ONNX: a QDQ graph onnxruntime runs with integer kernels; OpenVINO: FakeQuantize
nodes its CPU plugin runs as int8). The output layers (class logits, box regressions) stay in float, as in
:mod:`densekit.deploy.quantize`: their values are the scores and box offsets themselves, and quantising them costs
AP for a few percent of the FLOPs.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..quantize import calibration_batches
from .base import ArtifactError, ArtifactInfo, ExportRequest

log = logging.getLogger(__name__)


def calibration_inputs(request: ExportRequest, info: ArtifactInfo) -> list[np.ndarray]:
    """The calibration images as the artifact's inputs: float32 ``[B, 3, H, W]`` arrays in [0, 1], ``B`` the
    artifact's batch (a last partial batch is dropped unless it is the only one, which is then repeated to size).

    Raises:
        ArtifactError: no calibration images, or images of another size than the artifact's input.
    """
    if request.calibration is None:
        raise ArtifactError("export.precision=int8 needs calibration images: set data=<the training data config> "
                            "(its train split is used) and export.calibration_images=<count>")
    try:
        batches = calibration_batches(request.model, request.calibration, request.calibration_images)
    except ValueError as err:
        raise ArtifactError(f"int8 calibration: {err}") from err
    images = torch.cat(batches)
    if tuple(images.shape[-2:]) != tuple(info.image_size):
        h, w = info.image_size
        raise ArtifactError(
            f"calibration images are {images.shape[-2]}x{images.shape[-1]} but the artifact's input is {h}x{w}: "
            f"calibrate at the export size (detection: data.image_size={h}; segmentation: image_size=[{h},{w}] and "
            "data at that size)"
        )
    step = info.batch
    if images.shape[0] < step:
        images = images.repeat(-(-step // images.shape[0]), 1, 1, 1)[:step]
    usable = images.shape[0] - images.shape[0] % step
    return [images[i:i + step].contiguous().numpy() for i in range(0, usable, step)]


def output_producers(graph_outputs: list[Any], producer_of: Any) -> list[str]:
    """Names of the nodes that write the graph's outputs (``producer_of(output) -> name``): what stays float."""
    return sorted({producer_of(out) for out in graph_outputs})


def nncf_quantize(
    model: Any, inputs: list[np.ndarray], keep_float: list[str], feed: Any = None, per_tensor_activations: bool = False
) -> Any:
    """NNCF post-training quantisation of an ONNX ``ModelProto`` or an OpenVINO ``Model`` (same call, NNCF picks the
    backend), calibrated on ``inputs``, with the nodes named in ``keep_float`` left in float. ``feed`` turns an input
    array into what the backend's engine takes (ONNX: ``{input name: array}``; OpenVINO takes the array).
    ``per_tensor_activations``: one scale / zero point per activation tensor, as onnxruntime's integer convolution
    (``QLinearConv``: "input zero point must be a scalar") and TensorRT require; OpenVINO runs per-channel ones."""
    try:
        import nncf
    except ImportError as err:
        raise ArtifactError(f"int8 export needs NNCF: pip install 'densekit[deploy]' ({err})") from err

    dataset = nncf.Dataset(inputs, feed)
    scope = nncf.IgnoredScope(names=keep_float, validate=False) if keep_float else None
    log.info("NNCF: calibrating int8 on %d batches, keeping %d output layers in float", len(inputs), len(keep_float))
    kwargs: dict[str, Any] = {"subset_size": len(inputs)}  # items of the dataset, i.e. batches
    if per_tensor_activations:
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(
            activations_quantization_params=QuantizationParameters(per_channel=False))
    if scope is not None:
        kwargs["ignored_scope"] = scope
    return nncf.quantize(model, dataset, **kwargs)
