"""densekit loads efficientdet-pytorch (effdet) state_dicts and reproduces its raw outputs and detections."""
from __future__ import annotations

import pytest
import torch

effdet = pytest.importorskip("effdet")
from effdet import DetBenchPredict, EfficientDet as EffDet, get_efficientdet_config  # noqa: E402

import densekit  # noqa: E402
from densekit.checkpoint.convert import convert_effdet  # noqa: E402
from densekit.checkpoint.io import load_state_dict_checked  # noqa: E402

SIZE = 256  # small input: parity does not depend on resolution, CI time does


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random weights *and* BN statistics, so that a wrongly mapped BN cannot hide behind identity stats."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "edge_weights" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.2)  # positive, unequal fusion weights
            elif p.dim() == 1 and ("bn" in name.split(".")[-2] or name.endswith(("bn.weight", "bn.bias"))):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.2 + 1.0)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def make_pair(effdet_name: str, densekit_name: str, seed: int, size: int, **densekit_overrides):
    cfg = get_efficientdet_config(effdet_name)
    cfg.image_size = (size, size)
    torch.manual_seed(seed)  # effdet draws its conv weights from the global generator
    ref = EffDet(cfg, pretrained_backbone=False).eval()
    randomize_(ref, seed)
    ours = densekit.create_model(
        densekit_name,
        pixel_mean=list(cfg.mean) if "mean" in cfg else [0.485, 0.456, 0.406],
        pixel_std=list(cfg.std) if "std" in cfg else [0.229, 0.224, 0.225],
        **densekit_overrides,
    ).eval()
    load_state_dict_checked(ours, convert_effdet(ref.state_dict(), len(ours.backbone.feature_specs)), effdet_name)
    return cfg, ref, ours


def normalized(images01: torch.Tensor, cfg) -> torch.Tensor:
    mean = torch.tensor(cfg.mean if "mean" in cfg else (0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std if "std" in cfg else (0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    return (images01 - mean) / std


@pytest.mark.parametrize(
    "effdet_name,densekit_name,size",
    # Lite0 at its native 320 px: P7 is 3x3 (ceil of 2.5), so the input must not be padded to a multiple of 128.
    [("tf_efficientdet_d0", "efficientdet_d0", SIZE), ("tf_efficientdet_lite0", "efficientdet_lite0", 320)],
    ids=["d0-fast-fusion", "lite0-sum-fusion-320px"],
)
def test_raw_outputs_and_detections_match_effdet(effdet_name: str, densekit_name: str, size: int) -> None:
    cfg, ref, ours = make_pair(effdet_name, densekit_name, seed=0, size=size)
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_cls, ref_box = ref(normalized(images, cfg))
        cls, box = ours.forward_raw(images)
        assert len(cls) == len(ref_cls) == 5
        for a, b in zip(cls + box, ref_cls + ref_box):
            assert a.shape == b.shape
            assert (a - b).abs().max().item() <= 1e-4

        bench = DetBenchPredict(ref).eval()
        img_info = {"img_scale": torch.ones(2), "img_size": torch.tensor([[size, size]] * 2)}
        ref_dets = bench(normalized(images, cfg), img_info)
        dets = ours(images)
    for d, r in zip(dets, ref_dets):
        assert_same_detections(d, r[r[:, 4] > 0])  # effdet pads to 100 rows with zeros


def assert_same_detections(ours: dict[str, torch.Tensor], ref: torch.Tensor, score_tol: float = 1e-4) -> None:
    """Same boxes, scores and (1-based in effdet) labels in the same order, except that detections whose scores tie
    within ``score_tol`` may swap places (raw outputs agree to ~1e-5, which can reorder near-equal scores)."""
    assert len(ours["boxes"]) == len(ref) == 100
    torch.testing.assert_close(ours["scores"], ref[:, 4], atol=1e-5, rtol=1e-4)
    ref_labels = ref[:, 5].long() - 1
    cutoff = ref[-1, 4].item()
    for i in range(len(ref)):
        box, label, score = ours["boxes"][i], ours["labels"][i], ours["scores"][i].item()
        same = (ref_labels == label) & ((ref[:, :4] - box).abs().amax(1) <= 1e-3)
        tied = (ref[:, 4] - score).abs() <= score_tol
        if same[i]:
            continue
        assert (same & tied).any() or score - cutoff <= score_tol, f"detection {i} ({label}, {score:.6f}, {box.tolist()}) not in effdet's output"
