"""Backbone behaviour users depend on: feature descriptions, names, weight loading, errors."""
from __future__ import annotations

import time

import pytest
import timm
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from densekit.checkpoint.io import CheckpointError
from densekit.modeling.backbones import (
    Backbone,
    MobileNetV3Backbone,
    TimmBackbone,
    create_backbone,
    list_backbones,
)
from densekit.modeling.backbones._download import host_reachable

SIZE = 128


def test_every_backbone_implements_the_declared_load_weights() -> None:
    assert all(cls.load_weights is not Backbone.load_weights for cls in (TimmBackbone, MobileNetV3Backbone))


def _run(backbone: Backbone, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    with torch.no_grad():
        return backbone.eval()(torch.randn(1, 3, SIZE, SIZE))


def _assert_specs_match_outputs(backbone: Backbone) -> None:
    out = _run(backbone)
    assert list(out) == [s.name for s in backbone.feature_specs]
    for spec in backbone.feature_specs:
        assert spec.name == f"c{spec.level}"
        assert tuple(out[spec.name].shape) == (1, spec.channels, SIZE // spec.stride, SIZE // spec.stride), spec


def test_tf_efficientnet_b0_features():
    backbone = create_backbone("tf_efficientnet_b0")
    assert isinstance(backbone, TimmBackbone)
    assert backbone.strides == [8, 16, 32]
    assert backbone.out_channels == [40, 112, 320]
    assert [s.name for s in backbone.feature_specs] == ["c3", "c4", "c5"]
    _assert_specs_match_outputs(backbone)
    # The timm model is the body itself, so efficientdet-pytorch's backbone.* keys map to body.*.
    assert next(iter(backbone.state_dict())) == "body.conv_stem.weight"


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("tf_efficientnet_lite0", {}, [(8, 40), (16, 112), (32, 320)]),
        ("tf_efficientnetv2_s", {"out_levels": (2, 3, 4, 5)}, [(4, 48), (8, 64), (16, 160), (32, 256)]),
        ("efficientnet_es", {"drop_path_rate": 0.1}, [(8, 48), (16, 144), (32, 192)]),
        ("mobilenet_v3_large", {}, [(8, 40), (16, 112), (32, 960)]),
        ("mobilenet_v3_small", {"out_levels": (3, 5)}, [(8, 24), (32, 576)]),
        ("mobilenet_v3_large", {"dilated": True}, [(8, 40), (16, 960)]),
        ("mobilenet_v3_large", {"reduced_tail": True}, [(8, 40), (16, 112), (32, 480)]),
    ],
)
def test_feature_specs_match_outputs(name, kwargs, expected):
    backbone = create_backbone(name, **kwargs)
    assert [(s.stride, s.channels) for s in backbone.feature_specs] == expected
    _assert_specs_match_outputs(backbone)


def test_dilated_mobilenet_names_last_feature_by_its_stride():
    backbone = create_backbone("mobilenet_v3_large", dilated=True)
    assert isinstance(backbone, MobileNetV3Backbone)
    assert [s.name for s in backbone.feature_specs] == ["c3", "c4"]
    with pytest.raises(ValueError, match=r"output stride 16.*offers levels \[1, 2, 3, 4\]"):
        create_backbone("mobilenet_v3_large", dilated=True, out_levels=(3, 5))


def test_unavailable_level_lists_offered_levels():
    with pytest.raises(ValueError, match=r"level\(s\) \[6\].*offers levels \[1, 2, 3, 4, 5\]"):
        create_backbone("tf_efficientnet_b0", out_levels=(3, 6))


@pytest.mark.parametrize(
    "typo, suggestion", [("tf_efficientnet_bO", "tf_efficientnet_b0"), ("mobilenet_v3_larg", "mobilenet_v3_large")]
)
def test_unknown_name_suggests_close_matches(typo, suggestion):
    with pytest.raises(ValueError) as info:
        create_backbone(typo)
    message = str(info.value)
    assert repr(typo) in message and suggestion in message
    assert "mobilenet_v3_large, mobilenet_v3_small" in message
    assert "list_backbones()" in message


def test_list_backbones():
    names = list_backbones("*efficientnet_lite*")
    assert "tf_efficientnet_lite0" in names and "mobilenet_v3_large" not in names
    assert list_backbones("mobilenet_v3_*")[:2] == ["mobilenet_v3_large", "mobilenet_v3_small"]


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "mobilenet_v3_small"])
def test_weights_roundtrip(tmp_path, name):
    torch.manual_seed(1)
    source = create_backbone(name)
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    restored = create_backbone(name, weights=path)
    for (k, a), b in zip(_run(source).items(), _run(restored).values()):
        assert torch.equal(a, b), k


def test_bare_timm_classifier_state_dict_loads(tmp_path):
    """A full timm model's state_dict (with conv_head / bn2 / classifier) fills the features_only body."""
    model = timm.create_model("tf_efficientnet_lite0")
    path = tmp_path / "timm_full.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    backbone = create_backbone("tf_efficientnet_lite0", weights=path)
    assert torch.equal(backbone.body.blocks[6][0].conv_pwl.weight, model.blocks[6][0].conv_pwl.weight)


def test_wrong_checkpoint_names_keys_and_changes_nothing(tmp_path):
    backbone = create_backbone("tf_efficientnet_lite0")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}

    path = tmp_path / "mobilenet.pth"
    torch.save(create_backbone("mobilenet_v3_small").state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        backbone.load_weights(torch.load(path, weights_only=True), source=f"weights file {path}")
    assert "body.conv_stem.weight" in str(info.value) and str(path) in str(info.value)

    # Same architecture, one tensor of the wrong shape: that key is named, nothing is loaded.
    bad = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in before.items()}
    bad["body.blocks.2.0.conv_pwl.weight"] = torch.zeros(41, 144, 1, 1)
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match=r"body\.blocks\.2\.0\.conv_pwl\.weight: checkpoint \(41, 144, 1, 1\)"):
        create_backbone("tf_efficientnet_lite0", weights=path)
    with pytest.raises(CheckpointError, match="wrongly shaped"):
        backbone.load_weights(bad, source=str(path))
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_weights_and_pretrained_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="either"):
        create_backbone("tf_efficientnet_lite0", weights=tmp_path / "x.pth", pretrained=True)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "mobilenet_v3_large"])
def test_pretrained_offline_fails_fast(monkeypatch, tmp_path, name):
    # Empty caches, so the result cannot depend on weights someone downloaded earlier.
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        create_backbone(name, pretrained=True)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "offline" in message and "HF_HUB_OFFLINE" in message and "weights=" in message and name in message


def test_unreachable_host_probe_is_quick():
    start = time.monotonic()
    assert not host_reachable("densekit-no-such-host.invalid", timeout=2)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("out_levels", [(3, 4, 5), (3,)])
def test_torchvision_classifier_checkpoint(tmp_path, out_levels):
    """torchvision's own checkpoint loads (classifier dropped) and gives torchvision's intermediate outputs."""
    torch.manual_seed(2)
    model = torchvision.models.mobilenet_v3_large(weights=None).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a mis-wired layer cannot go unnoticed
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "mobilenet_v3_large-random.pth"
    torch.save(model.state_dict(), path)

    backbone = create_backbone("mobilenet_v3_large", out_levels=out_levels, weights=path)
    stage_ends = {3: "features.6", 4: "features.12", 5: "features.16"}  # last layer at strides 8 / 16 / 32
    reference = create_feature_extractor(model, {stage_ends[lvl]: f"c{lvl}" for lvl in out_levels})
    torch.manual_seed(3)
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected, actual = reference(images), backbone.eval()(images)
    assert list(actual) == [f"c{lvl}" for lvl in out_levels]
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    "backbone",
    [lambda: create_backbone("tf_efficientnet_lite0"), lambda: create_backbone("mnasnet_100"),
     lambda: MobileNetV3Backbone("mobilenet_v3_large")],
    ids=["timm-efficientnet", "timm-mnasnet", "torchvision-mobilenet_v3"],
)
def test_layers_up_to_stride_are_the_first_layers_at_that_stride(backbone) -> None:
    """What train.freeze_at freezes: a prefix of the network whose last layer outputs at exactly that stride."""
    backbone = backbone()
    strides: dict[int, int] = {}  # id(module) -> stride of its output on a SIZE input
    def record(module: torch.nn.Module, _: object, out: object) -> None:
        if torch.is_tensor(out):  # timm's features_only wrapper returns lists
            strides[id(module)] = SIZE // out.shape[-1]

    handles = [m.register_forward_hook(record) for m in backbone.modules()]
    _run(backbone)
    for h in handles:
        h.remove()
    order = [id(p) for p in backbone.parameters()]
    assert backbone.layers_up_to_stride(1) == []
    for stride in (2, 4, 8):
        layers = backbone.layers_up_to_stride(stride)
        assert strides[id(layers[-1])] == stride
        assert all(strides[id(m)] <= stride for m in layers)
        frozen = {id(p) for m in layers for p in m.parameters()}
        assert order[: len(frozen)] == [i for i in order if i in frozen]  # a prefix of the parameters
        assert max(strides[id(m)] for m in backbone.layers_up_to_stride(2 * stride)) == 2 * stride
