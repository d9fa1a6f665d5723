"""TensorRT on the device: a tiny EfficientDet-D0 exported as a TensorRT fp16 engine (``densekit.deploy.formats``)
gives the PyTorch network's outputs within fp16 tolerance, and runs end to end as a densekit model (densekit's
decoding and NMS on the engine's outputs, results on the device).

Without TensorRT the test is skipped with a reason that says an optional runtime is missing (the device check's
``tests_gpu`` step does not count that skip as a failure: its ``tensorrt`` step reports the missing TensorRT). On the
CPU (``DENSEKIT_TEST_DEVICE=cpu``, the device check's dry run) the same test exports an ONNX artifact (onnxruntime,
fp32) in TensorRT's place, held to the fp32 tolerance.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import densekit
from gpu_support import full_fp32
from densekit.deploy.formats import FORMATS, artifact_of, export_artifact, load_artifact_model
from densekit.deploy.formats.artifact import compare_outputs

OPTIONAL_SKIP = "optional runtime missing"  # tools/device_check.py's tests_gpu step knows this phrase
TINY = {"neck": {"repeats": 1, "channels": 16}, "head": {"repeats": 1}}
#: precision -> (mean relative difference, largest difference relative to the outputs' scale). fp16 rounds at 5e-4
#: and a network compounds it to ~1e-3 on average; a wrong kernel, layout or weight is off by O(1).
TOLERANCE = {"fp16": (1e-2, 5e-2), "fp32": (1e-5, 1e-4)}


def artifact_format(device: torch.device) -> tuple[str, str]:
    """TensorRT fp16 on CUDA; onnxruntime fp32 on the CPU (the dry run); skipped, saying so, where it is missing."""
    name, precision = ("tensorrt", "fp16") if device.type == "cuda" else ("onnx", "fp32")
    reason = FORMATS.get(name).missing()
    if reason:
        pytest.skip(f"{OPTIONAL_SKIP}: {reason}")
    return name, precision


def test_tiny_detector_engine_matches_pytorch(
    device: torch.device, randomise: Callable, tmp_path: Path
) -> None:
    fmt, precision = artifact_format(device)
    size = 128 if device.type == "cuda" else 64  # the CPU's 64 px, as the other tests here
    torch.manual_seed(0)
    model = densekit.create_model("efficientdet_d0", num_classes=3, image_size=[size, size], **TINY).eval()
    randomise(model)  # random BN statistics too: a wrongly folded BatchNorm cannot hide behind identity ones
    model.to(device)
    path = export_artifact(model, fmt, tmp_path / f"d0{FORMATS.get(fmt).suffix}", (size, size), precision=precision)
    engine = load_artifact_model(path).to(device)
    assert artifact_of(engine).info.precision == precision
    # Two images through a batch-1 engine: the artifact runs them one by one and joins the outputs.
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    with full_fp32():  # the PyTorch side in true fp32 (no TF32): the difference is the engine's alone
        diff = compare_outputs(model, engine, images)
    mean_rel, max_rel = TOLERANCE[precision]
    assert diff["mean_rel"] <= mean_rel, diff
    assert diff["max_abs"] <= max_rel * max(diff["scale"], 1.0), diff
    with torch.inference_mode():
        detections = engine(images)
    assert len(detections) == 2
    assert all(t.device.type == device.type for d in detections for t in d.values())
    assert all(d["boxes"].shape[0] == d["scores"].shape[0] == d["labels"].shape[0] for d in detections)
