"""Inference on the device: the same outputs as the CPU (relative to their scale), and post-processing that keeps
everything on the device. Random weights *and* random BN statistics (tests/conftest.py ``randomise``), so that a
wrong kernel cannot hide behind identity statistics."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from gpu_support import Scale, full_fp32, image_size
from densekit.modeling import postprocess

KINDS = ["detector", "segmenter"]


def eval_model(kind: str, make_model: Callable[[str], nn.Module], randomise: Callable) -> nn.Module:
    model = make_model(kind).eval()
    randomise(model)
    return model


def test_images(kind: str, scale: Scale) -> torch.Tensor:
    return torch.rand(scale.batch, 3, *image_size(kind, scale), generator=torch.Generator().manual_seed(1))


test_images.__test__ = False  # a helper, not a test


def tensors(outputs: object) -> list[torch.Tensor]:
    """Every tensor of a nested output (forward_raw's per-level lists, a tensor, a list of dicts)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [t for v in outputs.values() for t in tensors(v)]
    return [t for item in outputs for t in tensors(item)]


@pytest.mark.parametrize("kind", KINDS)
def test_network_outputs_equal_the_cpus(
    kind: str, device: torch.device, scale: Scale, make_model: Callable[[str], nn.Module], randomise: Callable
) -> None:
    """``forward_raw`` in fp32 (TF32 off) on the device against the CPU: within 1e-3 of each output's scale.
    A wrong kernel or layout is off by the order of the outputs themselves."""
    model = eval_model(kind, make_model, randomise)
    images = test_images(kind, scale)
    with torch.inference_mode():
        expected = tensors(model.forward_raw(images))
        with full_fp32():
            got = tensors(model.to(device).forward_raw(images.to(device)))
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.device == device and g.shape == e.shape
        err = ((g.cpu() - e).abs().max() / e.abs().max().clamp(min=1.0)).item()
        assert err <= 1e-3, f"output {i}: {err:.2e} of its scale"


def tame_head(model: nn.Module, images: torch.Tensor) -> None:
    """Rescale the detector's two prediction convs (its last, linear layers) so that class logits have a standard
    deviation of 2 and box regressions of 0.2. With random BN statistics logits reach the hundreds, where sigmoid
    scores saturate at exactly 1.0 and tie: the order of tied boxes in NMS is then any sort's choice, not a result."""
    with torch.no_grad():
        cls_out, box_out = model.forward_raw(images)
        for tower, outputs, std in ((model.head.class_net, cls_out, 2.0), (model.head.box_net, box_out, 0.2)):
            factor = std / torch.cat([o.flatten() for o in outputs]).std()
            tower.predict.conv_pw.weight.mul_(factor)
            tower.predict.conv_pw.bias.mul_(factor)


def test_detections_equal_the_cpus(
    device: torch.device, scale: Scale, make_model: Callable[[str], nn.Module], randomise: Callable
) -> None:
    """End to end (top-k, decoding, NMS): the device's detections are the CPU's. Float rounding can swap two
    candidates that tie to 1e-6, so each detection is matched (same class, corners within 0.05 px, score within
    1e-3) rather than compared by position; all but 2% must match, and the counts must agree within 2%."""
    model = eval_model("detector", make_model, randomise)
    images = test_images("detector", scale)
    tame_head(model, images)
    with torch.inference_mode():
        expected = model(images)
        with full_fp32():
            got = model.to(device)(images.to(device))
    for g, e in zip(got, expected):
        g = {k: v.cpu() for k, v in g.items()}
        assert len(e["scores"]) > 0 and abs(len(g["scores"]) - len(e["scores"])) <= 0.02 * len(e["scores"])
        corners = (g["boxes"][:, None] - e["boxes"][None]).abs().amax(-1)  # (clipped boxes can be degenerate: no IoU)
        same = (corners < 0.05) & (g["labels"][:, None] == e["labels"][None]) & (
            (g["scores"][:, None] - e["scores"][None]).abs() < 1e-3
        )
        assert same.any(1).float().mean() >= 0.98


def test_label_maps_equal_the_cpus(
    device: torch.device, scale: Scale, make_model: Callable[[str], nn.Module], randomise: Callable
) -> None:
    """The segmenter's argmax on the device: the CPU's label at 99.9% of pixels at least (near-ties may flip)."""
    model = eval_model("segmenter", make_model, randomise)
    images = test_images("segmenter", scale)
    with torch.inference_mode():
        expected = model(images)
        with full_fp32():
            got = model.to(device)(images.to(device))
    for g, e in zip(got, expected):
        assert g["sem_seg"].device == device
        assert (g["sem_seg"].cpu() == e["sem_seg"]).float().mean() >= 0.999


@pytest.mark.parametrize("kind", KINDS)
def test_end_to_end_copies_nothing_to_the_host(
    kind: str, device: torch.device, scale: Scale, make_model: Callable[[str], nn.Module], randomise: Callable,
    host_reads: Callable, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``model(images)`` (network, top-k, decoding, NMS / argmax) never copies tensor data to the host (no
    ``.item()``, ``.tolist()``, ``.cpu()``, ...) and returns its results on the device. Only the sizes of
    data-dependent results (nonzero, NMS) reach the host. On the CPU the GPU's way of gathering the top-k
    candidates is forced (``split_on_host``), so the dry run holds the same code to the same rule."""
    monkeypatch.setattr(postprocess, "split_on_host", lambda device: False)
    model = eval_model(kind, make_model, randomise).to(device)
    images = test_images(kind, scale).to(device)
    with torch.inference_mode():
        model(images)  # first call: anchors and padding sizes are cached
        with host_reads(device="any") as reads:
            results = model(images)
    assert reads.calls == []
    assert len(results) == scale.batch
    assert all(t.device == device for t in tensors(results))
