"""torchvision's MobileNetV3 (large / small) as a densekit :class:`Backbone`.

torchvision's ``model.features`` Sequential is kept as ``self.features`` with its original child indices, so a
torchvision classification checkpoint loads once its ``classifier.*`` tensors are dropped.

Feature naming: ``"c{L}"`` is the output of the *last* layer of ``features`` whose cumulative stride is ``2**L``,
the stride being computed from the layers' convolutions rather than from per-model index tables. With
``dilated=True`` torchvision replaces the last stage's stride 2 by dilation 2, so the output stride is 16: the
final 960/576-channel layer then has stride 16 and is ``"c4"`` (there is no ``"c5"``), and the former
stride-16 stage end (112/48 channels) is no longer returned. Hence the default levels are (3, 4, 5), or (3, 4)
when dilated -- in both cases the stride-8 feature plus the last one(s), which is what LR-ASPP needs.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence

import torch
import torchvision.models as tvm
from torch import nn

from ...checkpoint.io import CheckpointError, load_state_dict_checked
from ..grad_checkpoint import checkpointed
from ._download import download_errors_explained, ensure_download_possible, torch_hub_cached
from .base import Backbone, FeatureSpec, level_name
from .family import BACKBONE_FAMILIES, BackboneFamily, no_block_rules

_BUILDERS: dict[str, tuple[Callable[..., nn.Module], type]] = {
    "mobilenet_v3_large": (tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights),
    "mobilenet_v3_small": (tvm.mobilenet_v3_small, tvm.MobileNet_V3_Small_Weights),
}
TORCHVISION_BACKBONES: tuple[str, ...] = tuple(_BUILDERS)


def _layer_strides(features: nn.Sequential) -> list[tuple[int, int]]:
    """``(cumulative stride, out channels)`` after each layer of ``features``, from its convolutions."""
    table: list[tuple[int, int]] = []
    stride = 1
    for layer in features:
        convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
        for conv in convs:  # squeeze-excitation 1x1 convs have stride 1 and do not disturb the product
            stride *= conv.stride[0]
        channels = getattr(layer, "out_channels", None) or convs[-1].out_channels
        table.append((stride, int(channels)))
    return table


class MobileNetV3Backbone(Backbone):
    """Multi-scale features from torchvision's ``mobilenet_v3_large`` / ``mobilenet_v3_small``.

    Args:
        name: ``"mobilenet_v3_large"`` or ``"mobilenet_v3_small"``.
        out_levels: Pyramid levels to return (level L has stride ``2**L``). ``None``: (3, 4, 5), or (3, 4) when
            ``dilated`` (see the module docstring for how dilation renames the last feature).
        dilated: Dilate the last stage instead of striding it (output stride 16), as torchvision's
            segmentation models do.
        pretrained: Load torchvision's ImageNet weights (fails fast with a clear message when offline).
        reduced_tail: Halve the channels of the last stage (torchvision's option; no pretrained weights exist).
        stage_start_levels: Levels read after the first (strided) block of their stage instead of at the stage end;
            torchvision's LR-ASPP takes its stride-8 skip there (``features[4]`` of Large, ``features[2]`` of Small).

    Raises:
        ValueError: unknown name, a level the configuration does not have, or pretrained with reduced_tail.
    """

    def __init__(
        self,
        name: str,
        out_levels: Sequence[int] | None = None,
        dilated: bool = False,
        pretrained: bool = False,
        reduced_tail: bool = False,
        stage_start_levels: Sequence[int] = (),
    ):
        super().__init__()
        if name not in _BUILDERS:
            raise ValueError(f"unknown torchvision backbone {name!r}; choose from {', '.join(TORCHVISION_BACKBONES)}")
        if pretrained and reduced_tail:
            raise ValueError("torchvision has no pretrained weights for reduced_tail=True; use pretrained=False")
        self.name = name
        levels = (3, 4) if out_levels is None and dilated else (3, 4, 5) if out_levels is None else out_levels
        levels = sorted(int(lvl) for lvl in levels)
        if not levels or len(set(levels)) != len(levels):
            raise ValueError(f"out_levels must be non-empty and free of duplicates, got {tuple(levels)}")

        builder, weights_enum = _BUILDERS[name]
        if pretrained:
            weights = weights_enum.DEFAULT
            what = f"torchvision {name} ({weights})"
            ensure_download_possible(what, weights.url, torch_hub_cached(weights.url))
            with download_errors_explained(what, weights.url):
                model = builder(weights=weights, dilated=dilated, reduced_tail=reduced_tail)
        else:
            model = builder(weights=None, dilated=dilated, reduced_tail=reduced_tail)

        table = _layer_strides(model.features)
        last_at_level: dict[int, int] = {}
        for index, (stride, _) in enumerate(table):
            level = stride.bit_length() - 1
            if level in stage_start_levels and level in last_at_level:
                continue  # keep the stage's first (strided) block
            last_at_level[level] = index  # later index wins: the end of the stage
        missing = [lvl for lvl in levels if lvl not in last_at_level]
        if missing:
            note = " (dilated=True: output stride 16, the last feature is c4)" if dilated else ""
            raise ValueError(
                f"{name}{note} has no feature at level(s) {missing}; it offers levels {sorted(last_at_level)}"
            )
        self._indices = [last_at_level[lvl] for lvl in levels]
        # Layers past the deepest requested one would be parameters without gradients (a DDP error), so they
        # are cut off; child indices stay torchvision's because the kept part is a prefix.
        self.features = nn.Sequential(*list(model.features)[: self._indices[-1] + 1])
        self._layer_strides = [stride for stride, _ in table[: self._indices[-1] + 1]]
        self.feature_specs = [
            FeatureSpec(level_name(lvl), table[i][0], table[i][1]) for lvl, i in zip(levels, self._indices)
        ]
        self.dilated = dilated
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every ``features[i]`` block in the backward pass (each is one inverted-residual block)."""
        self.grad_checkpointing = enable

    def layers_up_to_stride(self, stride: int) -> list[nn.Module]:
        """``features[0..i]``: every layer whose cumulative stride is at most ``stride`` (``features[0]`` is the stem)."""
        return [layer for layer, s in zip(self.features, self._layer_strides) if s <= stride]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        wanted = {index: spec.name for index, spec in zip(self._indices, self.feature_specs)}
        out: dict[str, torch.Tensor] = {}
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        x = images
        for index, layer in enumerate(self.features):
            x = checkpointed(layer, x) if recompute else layer(x)
            if index in wanted:
                out[wanted[index]] = x
        return out

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load densekit's own or a torchvision classification state_dict, all-or-nothing.

        ``classifier.*`` and the ``features.N`` layers this backbone cut off (deeper than its last level) are
        ignored; everything else must match exactly.

        Raises:
            CheckpointError: naming ``source`` and the keys that do not fit; the backbone is left unchanged.
        """
        kept = len(self.features)
        filtered: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            if key.startswith("classifier."):
                continue
            parts = key.split(".")
            if parts[0] == "features" and len(parts) > 2 and parts[1].isdigit() and int(parts[1]) >= kept:
                continue
            filtered[key] = value
        if not any(k.startswith("features.") for k in filtered):
            raise CheckpointError(
                f"{source} is not a torchvision MobileNetV3 / densekit MobileNetV3Backbone checkpoint "
                f"(no 'features.*' keys; first keys: {', '.join(list(state_dict)[:5])})"
            )
        load_state_dict_checked(self, filtered, source)


def _build_mobilenet_v3(
    name: str,
    out_levels: Sequence[int] | None = None,
    pretrained: bool = False,
    image_size: Sequence[int] | int | None = None,
    **options: object,
) -> MobileNetV3Backbone:
    """The MobileNetV3 family's builder; ``image_size`` is ignored: the network runs at any input size."""
    return MobileNetV3Backbone(name, out_levels=out_levels, pretrained=pretrained, **options)  # type: ignore[arg-type]


BACKBONE_FAMILIES.register("torchvision_mobilenet_v3")(
    BackboneFamily(
        label="MobileNetV3",
        matches=lambda name: name in _BUILDERS,
        build=_build_mobilenet_v3,
        backbone_type=MobileNetV3Backbone,
        list_names=lambda pattern, pretrained: [n for n in TORCHVISION_BACKBONES if fnmatch.fnmatch(n, pattern)],
        hint=f"torchvision backbones: {', '.join(TORCHVISION_BACKBONES)}.",
        # drop_path_rate, which every backbone config carries, is not read: MobileNetV3 has no stochastic depth.
        options=("dilated", "reduced_tail", "stage_start_levels"),
        # torchvision builds each conv + BN as a Conv2dNormActivation, an nn.Sequential (conv, bn, act): the
        # structural Sequential rule folds all of them, no block needs rules of its own.
        fold_rules=no_block_rules,
    )
)
