"""BN folding covers every backbone the shipped model configs use, family by family.

Each distinct ``backbone`` node of ``conf/model/*.yaml`` is built alone (random weights *and* random BN statistics,
64 px inputs: the file runs in about half a minute on two CPU cores), folded strictly, and compared with the unfolded
backbone in eval mode. What is left unfolded is asserted exactly, with the reason its family's rules give.

The random BN scales are halved: at the shared fixture's ~1 every residual block adds to the activations, and a
network this deep becomes chaotic (EfficientNetV2-S turns a 1e-14 change of its input into 4e-7 of its output, and
float32 rounding into a fifth of the output scale), which no tolerance can tell from a wrong fold. Halved, the
outputs stay O(1) and float32 rounding stays near 1e-6 of them, while the statistics a fold bakes in stay random.
"""
from __future__ import annotations

import copy
import importlib
import json
import warnings

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from densekit.deploy.optimize import fold_batchnorm, unfolded_batchnorms
from densekit.modeling.backbones import build_backbone, family_of
from densekit.modeling.backbones.timm_folding import TIMM_BLOCKS
from densekit.modeling.build import list_models, load_model_config

SIZE = 64
REL_TOL = 1e-4  # of each feature's scale; measured: at most 2e-6

#: BNs a backbone keeps by design: CoAtNet's MBConv pre-norm (no conv precedes it) and, as its SE runs between
#: conv2_kxk and norm2 (se_early), that norm2 too. Everything else folds.
KEPT = {"coatnet_0_rw_224": {"pre_norm": "no conv precedes", "norm2": "squeeze-excitation"}}


def _shipped_backbones() -> dict[str, tuple[str, object]]:
    """One entry per distinct backbone node of the shipped model configs: id -> (model name, backbone config)."""
    found: dict[str, tuple[str, object]] = {}
    for model in list_models():
        cfg = load_model_config(model)
        node = OmegaConf.to_container(cfg.backbone)
        node.pop("drop_path_rate")  # stochastic depth is off in eval mode: the same network to fold
        key = json.dumps(node, sort_keys=True)
        if key not in found:
            found[key] = (model, cfg.backbone)
    return {f"{cfg.name}-{model}": (model, cfg) for model, cfg in found.values()}


BACKBONES = _shipped_backbones()


def _random_contractive(model: nn.Module, randomise) -> nn.Module:
    """``model`` in eval mode with random weights and BN statistics, its BN scales halved (see the module docstring)."""
    model.eval()
    randomise(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.mul_(0.5)
    return model


def _scaled_max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest difference over the features, each relative to that feature's scale."""
    assert a.keys() == b.keys()
    scales = {k: a[k].abs().max().item() for k in a}
    assert min(scales.values()) > 1e-2, f"outputs too small for a relative tolerance to mean anything: {scales}"
    return max((a[k] - b[k]).abs().max().item() / scales[k] for k in a)


# B4-B7 are built from the same timm block classes as B0-B3 (the rules under test): `make test-all` folds them too.
_LARGE = ("tf_efficientnet_b4", "tf_efficientnet_b5", "tf_efficientnet_b6", "tf_efficientnet_b7")


@pytest.mark.parametrize(
    "key", [pytest.param(k, marks=pytest.mark.slow) if k.startswith(_LARGE) else k for k in BACKBONES]
)
def test_every_shipped_backbone_folds_exactly(key: str, randomise) -> None:
    model_name, cfg = BACKBONES[key]
    torch.manual_seed(0)
    backbone = _random_contractive(build_backbone(cfg, image_size=(SIZE, SIZE)), randomise)
    folded = copy.deepcopy(backbone)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no folding rule covers" warning either
        assert fold_batchnorm(folded, strict=True) > 0
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert _scaled_max_diff(backbone(x), folded(x)) <= REL_TOL, model_name

    left = unfolded_batchnorms(folded)
    assert all(why is not None for why in left.values()), left
    expected = KEPT.get(cfg.name, {})
    for path, why in left.items():
        name = path.rpartition(".")[2]
        assert name in expected and expected[name] in why, (path, why)
    remaining = [n for n, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(remaining) == sorted(left)
    if expected:  # each kept kind really occurs: the expectation is not stale
        assert {path.rpartition(".")[2] for path in left} == set(expected)


def test_the_shipped_backbones_span_both_families() -> None:
    labels = {family_of(cfg.name).label for _, cfg in BACKBONES.values()}
    assert labels == {"timm", "MobileNetV3"}


@pytest.mark.parametrize("qualified", list(TIMM_BLOCKS))
def test_timm_rules_name_classes_timm_has(qualified: str) -> None:
    """A rule keyed by a class timm moved or renamed would never apply: each key must import."""
    module, _, name = qualified.rpartition(".")
    assert isinstance(getattr(importlib.import_module(module), name), type)


class _UnknownBlock(nn.Module):
    """A block no rule describes: its conv and BN could be in any order in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_uncovered_batchnorm_warns_once_naming_the_class_or_raises_when_strict() -> None:
    model = nn.Sequential(_UnknownBlock(), _UnknownBlock()).eval()
    expected = r"covers the BatchNorm\(s\) bn of .*_UnknownBlock \(2 in all, e.g. 0.bn\)"
    with pytest.warns(UserWarning, match=expected) as rec:
        assert fold_batchnorm(model) == 0
    assert len([w for w in rec if "no folding rule" in str(w.message)]) == 1
    assert unfolded_batchnorms(model) == {"0.bn": None, "1.bn": None}
    with pytest.raises(ValueError, match="_UnknownBlock"):
        fold_batchnorm(model, strict=True)


def test_kept_and_unfoldable_batchnorms_are_not_reported_as_uncovered() -> None:
    conv = nn.Conv2d(3, 4, 1)
    shared = nn.Sequential(nn.Sequential(conv, nn.BatchNorm2d(4)), nn.Sequential(conv, nn.BatchNorm2d(4))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fold_batchnorm(shared, strict=True) == 0
    assert all("shared" in why for why in unfolded_batchnorms(shared).values())


def test_a_bare_timm_model_folds_by_its_family_rules(randomise) -> None:
    """Outside a densekit backbone wrapper, the family that defines a block still answers for it."""
    import timm

    model = _random_contractive(timm.create_model("tf_efficientnet_lite0", features_only=True), randomise)
    folded = copy.deepcopy(model)
    fold_batchnorm(folded, strict=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.inference_mode():
        diff = _scaled_max_diff(dict(enumerate(model(x))), dict(enumerate(folded(x))))
    assert diff <= REL_TOL
