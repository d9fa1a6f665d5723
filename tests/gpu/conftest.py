"""tests/gpu: what only a GPU can prove (CUDA training steps under AMP, parity with the CPU, device-side
post-processing, tools/train.py on CUDA, NCCL DDP + SyncBN).

Which device they run on comes from ``DENSEKIT_TEST_DEVICE``:

* unset: CUDA when this machine has it, else every test here is skipped (the normal suite pays nothing);
* ``cuda``: CUDA, and an error where there is none (the device check must not pass by skipping);
* ``cpu``: the same tests on the CPU at tiny sizes: the device check's dry run, so that this code is known to
  work before it meets a GPU (the gloo backend stands in for NCCL, and CPU-vs-CPU parity is trivially met).

Sizes: on CUDA the real EfficientDet-D0 and ESeg-Lite-S at 256 / 512 px, batch 2; on the CPU one-repeat,
16-channel versions of the same models at 64 px.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import densekit
from gpu_support import HERE, Scale, gpu_test_device


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this folder's tests where there is no device for them (decided once, before anything runs)."""
    device, reason = gpu_test_device()
    if device is not None:
        return
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def device() -> torch.device:
    found, reason = gpu_test_device()
    if found is None:  # only reached if the collection hook did not skip (e.g. a test selected by node id)
        pytest.skip(reason)
    return found


@pytest.fixture(scope="session")
def scale(device: torch.device) -> Scale:
    if device.type == "cpu":
        neck = {"repeats": 1, "channels": 16}
        # fp16 convolutions are reference kernels on the CPU (seconds a step): 1 step there; on CUDA up to 12.
        detector = {"neck": neck, "head": {"repeats": 1}}
        return Scale(64, 64, 2, 1, detector, {"neck": neck, "head": {"repeats": 1, "channels": 16}})
    return Scale(256, 512, 2, 12, {}, {})


@pytest.fixture
def make_model(scale: Scale) -> Callable[[str], nn.Module]:
    """``make_model("detector" | "segmenter")``: EfficientDet-D0 (3 classes) or ESeg-Lite-S (4 classes), seeded."""

    def make(kind: str) -> nn.Module:
        torch.manual_seed(0)
        if kind == "detector":
            size = [scale.image, scale.image]
            return densekit.create_model("efficientdet_d0", num_classes=3, image_size=size, **scale.detector)
        return densekit.create_model("eseg_lite_s", num_classes=4, **scale.segmenter)

    return make
