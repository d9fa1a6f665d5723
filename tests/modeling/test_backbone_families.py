"""Backbone families: names, options, builders and BN-folding rules come from the family that owns a backbone."""
from __future__ import annotations

import fnmatch
import warnings

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from densekit.config import SegBackboneConfig
from densekit.deploy.optimize import fold_batchnorm, unfolded_batchnorms
from densekit.modeling.backbones import (
    BACKBONE_FAMILIES,
    Backbone,
    BackboneFamily,
    BlockFolding,
    FeatureSpec,
    MobileNetV3Backbone,
    TimmBackbone,
    build_backbone,
    create_backbone,
    family_of,
    list_backbones,
)


class _ToyBlock(nn.Module):
    """conv -> bn as attributes: only its family's rule says that forward runs them back to back."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, stride=8, padding=1)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class _ToyBackbone(Backbone):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.block = _ToyBlock(width)
        self.feature_specs = [FeatureSpec("c3", 8, width)]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"c3": self.block(images)}


def _build_toy(name: str, out_levels=None, pretrained: bool = False, image_size=None, width: int = 4) -> _ToyBackbone:
    return _ToyBackbone(width)


def _toy_family(**changes: object) -> BackboneFamily:
    fields = dict(
        label="Toy",
        matches=lambda name: name.startswith("toy_"),
        build=_build_toy,
        backbone_type=_ToyBackbone,
        list_names=lambda pattern, pretrained: fnmatch.filter(["toy_a", "toy_b"], pattern),
        hint="toy backbones: toy_a, toy_b.",
        options=("width",),
        fold_rules=lambda m: BlockFolding(pairs=(("conv", "bn"),)) if isinstance(m, _ToyBlock) else None,
    )
    return BackboneFamily(**{**fields, **changes})


@pytest.fixture
def toy_family(monkeypatch: pytest.MonkeyPatch) -> BackboneFamily:
    """The toy family registered for one test (the registry's table is restored afterwards)."""
    monkeypatch.setattr(BACKBONE_FAMILIES, "_entries", dict(BACKBONE_FAMILIES._entries))
    return BACKBONE_FAMILIES.register("toy")(_toy_family())


def _backbone_cfg(name: str, **options: object) -> object:
    return OmegaConf.create({"name": name, "out_levels": [3], "weights": None, "pretrained": False,
                             "drop_path_rate": 0.2, **options})


@pytest.mark.parametrize(
    "name, label, cls",
    [("mobilenet_v3_large", "MobileNetV3", MobileNetV3Backbone), ("tf_efficientnet_b0", "timm", TimmBackbone),
     ("coatnet_0_rw_224", "timm", TimmBackbone), ("resnet50.a1_in1k", "timm", TimmBackbone)],
)
def test_each_name_has_one_family_which_builds_it(name: str, label: str, cls: type) -> None:
    family = family_of(name)
    assert family.label == label and family.backbone_type is cls


def test_an_option_of_another_family_is_refused_naming_that_family_and_its_options() -> None:
    cfg = OmegaConf.structured(SegBackboneConfig(name="efficientnet_es", stage_start_levels=[3]))
    with pytest.raises(ValueError) as err:
        build_backbone(cfg)
    assert str(err.value) == (
        "backbone.stage_start_levels is a MobileNetV3 option (for mobilenet_v3_large, mobilenet_v3_small; MobileNetV3 "
        "options: dilated, reduced_tail, stage_start_levels), not for 'efficientnet_es', a timm backbone (its "
        "options: drop_path_rate)"
    )


def test_mobilenet_ignores_the_schema_drop_path_rate_and_reads_its_own_options() -> None:
    cfg = OmegaConf.structured(SegBackboneConfig(name="mobilenet_v3_small", out_levels=[3, 4], dilated=True,
                                                 stage_start_levels=[3], drop_path_rate=0.3))
    backbone = build_backbone(cfg)
    assert backbone.dilated and [s.stride for s in backbone.feature_specs] == [8, 16]


def test_a_new_family_is_one_registration(toy_family: BackboneFamily) -> None:
    backbone = create_backbone("toy_a", width=6)
    assert isinstance(backbone, _ToyBackbone) and backbone.out_channels == [6]
    assert build_backbone(_backbone_cfg("toy_b", width=5)).out_channels == [5]
    assert list_backbones("toy_*") == ["toy_a", "toy_b"]
    with pytest.raises(ValueError, match=r"backbone.width is a Toy option \(for toy_a, toy_b; Toy options: width\)"):
        build_backbone(_backbone_cfg("tf_efficientnet_b0", width=5))
    with pytest.raises(ValueError, match=r"Closest matches: toy_a.*toy backbones: toy_a, toy_b\."):
        create_backbone("tpy_a")


def test_folding_asks_the_backbone_family(toy_family: BackboneFamily, randomise) -> None:
    backbone = create_backbone("toy_a").eval()
    randomise(backbone)
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        before = backbone(x)["c3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fold_batchnorm(backbone, strict=True) == 1
    with torch.inference_mode():
        torch.testing.assert_close(backbone(x)["c3"], before, atol=1e-5, rtol=1e-5)
    assert unfolded_batchnorms(backbone) == {}


def test_the_same_block_outside_its_family_is_reported_not_guessed(toy_family: BackboneFamily) -> None:
    """A family's rules apply to its own blocks: without them a conv + BN pair is not folded, and that is said."""
    model = nn.Sequential(_ToyBlock(4), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4))).eval()
    BACKBONE_FAMILIES._entries.pop("toy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fold_batchnorm(model) == 0
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2, messages  # one per block class
    assert "BatchNorm(s) 1 of torch.nn.modules.container.Sequential (1 in all, e.g. 1.1)" in messages[0]
    assert f"BatchNorm(s) bn of {_ToyBlock.__module__}._ToyBlock (1 in all, e.g. 0.bn)" in messages[1]
    assert unfolded_batchnorms(model) == {"0.bn": None, "1.1": None}


def test_families_refuse_to_share_a_backbone_class_or_a_name(toy_family: BackboneFamily) -> None:
    with pytest.raises(KeyError, match="backbone family 'toy2' cannot be registered: backbone family 'toy' already"):
        BACKBONE_FAMILIES.register("toy2")(_toy_family())
    BACKBONE_FAMILIES.register("greedy")(_toy_family(matches=lambda name: True, backbone_type=nn.Module))
    with pytest.raises(RuntimeError, match="claimed by several families: toy, greedy"):
        family_of("toy_a")


def test_list_backbones_goes_family_by_family() -> None:
    names = list_backbones("*mobilenet*")
    assert names[:2] == ["mobilenet_v3_large", "mobilenet_v3_small"] and len(names) > 2
