"""Structured config schemas.

The YAML files under ``conf/model`` hold only what differs from these defaults (which are EfficientDet's official
settings), so each model file reads as the paper's table row. Merging a YAML onto its schema rejects unknown keys
and wrong types with the key's full name, e.g. ``Key 'neck.chanels' not in 'NeckConfig'``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, ListConfig

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class BackboneConfig:
    name: str = "tf_efficientnet_b0"
    out_levels: list[int] = field(default_factory=lambda: [3, 4, 5])
    pretrained: bool = False  # download ImageNet weights through timm / torchvision (needs internet)
    weights: Optional[str] = None  # local backbone weights (timm, efficientnet_pytorch or torchvision layout)
    drop_path_rate: float = 0.2


@dataclass
class NeckConfig:
    type: str = "bifpn"  # a name in densekit.modeling.registry.NECKS
    min_level: int = 3
    max_level: int = 7
    channels: int = 64
    repeats: int = 3
    fusion: str = "fast"  # fast | softmax | sum


@dataclass
class HeadConfig:
    repeats: int = 3


@dataclass
class AnchorConfig:
    num_scales: int = 3
    aspect_ratios: list[list[float]] = field(default_factory=lambda: [[1.0, 1.0], [1.4, 0.7], [0.7, 1.4]])
    anchor_scale: float = 4.0


@dataclass
class LossConfig:
    alpha: float = 0.25
    gamma: float = 1.5
    huber_delta: float = 0.1
    box_loss_weight: float = 50.0
    match_iou: float = 0.5


@dataclass
class PostprocessConfig:
    pre_nms_top_k: int = 5000
    nms_iou: float = 0.5
    max_detections: int = 100
    score_threshold: float = 0.0
    soft_nms: bool = False
    soft_nms_sigma: float = 0.5


@dataclass
class EfficientDetConfig:
    name: str = "efficientdet_d0"
    arch: str = "efficientdet"
    num_classes: int = 90
    image_size: list[int] = field(default_factory=lambda: [512, 512])  # (H, W) the model was designed for
    act: str = "swish"
    tf_padding: bool = True  # TF 'SAME' pooling, needed by the TF-ported checkpoints
    redundant_bias: bool = True  # conv bias before BN, present in the TF-ported checkpoints
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01
    pixel_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # for inputs scaled to [0, 1]
    pixel_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    # Name of each predicted label (label i: class_names[i]); set from the dataset by tools/train.py, so the
    # names travel in the checkpoint's config. None: COCO's names for a 90-class head, else "class <i>".
    class_names: Optional[list[str]] = None
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    # Recompute backbone stages and neck layers in the backward pass: less training memory (D6-D7x), more time.
    grad_checkpoint: bool = False


@dataclass
class SegBackboneConfig(BackboneConfig):
    """:class:`BackboneConfig` plus the MobileNetV3 options segmentation needs (timm backbones must leave them off)."""

    dilated: bool = False  # MobileNetV3: dilate the last stage instead of striding it (output stride 16)
    reduced_tail: bool = False  # MobileNetV3: halve the last stage's channels (the paper's "RF2")
    # Levels whose feature is the output of the stage's *first* (strided) block instead of the stage end.
    # torchvision's LR-ASPP reads its stride-8 skip there (features[4] of MobileNetV3-Large): [3] to load its weights.
    stage_start_levels: list[int] = field(default_factory=list)


@dataclass
class SegHeadConfig:
    type: str = "eseg"  # a name in densekit.modeling.registry.SEG_HEADS: eseg | lraspp
    channels: Optional[int] = None  # eseg: conv width (None: the neck's); lraspp: inter_channels (None: 128)
    repeats: int = 2  # eseg: separable conv + BN + act blocks after the level fusion (lraspp: unused)


@dataclass
class SegLossConfig:
    # Online hard example mining: average the loss over the hardest pixels only (off by default).
    ohem: bool = False
    ohem_thresh: Optional[float] = 0.7  # keep pixels whose true-class probability is below this...
    ohem_min_kept: int = 100_000  # ...but at least this many of the hardest (per batch); thresh None: exactly these


@dataclass
class SegmenterConfig:
    name: str = "eseg_s"
    arch: str = "segmenter"
    num_classes: int = 19  # Cityscapes trainIds 0-18
    ignore_index: int = 255
    image_size: list[int] = field(default_factory=lambda: [1024, 2048])  # (H, W) the model was designed for
    act: str = "swish"  # BiFPN and ESeg head (LR-ASPP's head is ReLU by definition)
    tf_padding: bool = False  # BiFPN max-pool padding; no TF-ported segmentation checkpoints exist
    redundant_bias: bool = False
    bn_eps: float = 1e-3  # neck and head BatchNorms
    bn_momentum: float = 0.01
    pixel_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # for inputs scaled to [0, 1]
    pixel_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    # Name of each predicted label (label i: class_names[i]); set from the dataset by tools/train.py, so the
    # names travel in the checkpoint's config. None: COCO's names for a 90-class head, else "class <i>".
    class_names: Optional[list[str]] = None
    backbone: SegBackboneConfig = field(default_factory=SegBackboneConfig)
    neck: Optional[NeckConfig] = field(default_factory=lambda: NeckConfig(max_level=9))  # null: head on the backbone
    head: SegHeadConfig = field(default_factory=SegHeadConfig)
    loss: SegLossConfig = field(default_factory=SegLossConfig)
    # Recompute backbone stages and neck layers in the backward pass: less training memory (D6-D7x), more time.
    grad_checkpoint: bool = False


@dataclass
class TrainConfig:
    """Training settings (Hydra group ``train``). Defaults follow the official EfficientDet recipe."""

    batch_size: int = 8  # per process
    epochs: int = 300
    max_steps: Optional[int] = None  # overrides epochs when set
    optimizer: str = "sgd"  # sgd | adamw
    lr: Optional[float] = None  # absolute learning rate; default: base_lr scaled by total batch / 64
    base_lr: float = 0.08  # at a total batch of 64 (official); AdamW: use ~1e-3
    momentum: float = 0.9
    weight_decay: float = 4e-5
    schedule: str = "cosine"  # cosine | poly
    warmup_epochs: float = 1.0
    warmup_factor: float = 0.1  # official warm-up starts at 0.008 = 0.1 x 0.08
    clip_grad_norm: Optional[float] = 10.0
    ema_decay: float = 0.9998  # 0 disables EMA
    amp: str = "none"  # none | fp16 | bf16 (bf16 also works on CPU)
    # NHWC weights and batches: oneDNN's and cuDNN's fast convolution layouts (docs/benchmarks.md: ~2x on CPU)
    channels_last: bool = True
    # torch.compile of the network and the loss: 0.7x the eager D0 step, after 2.5 min of compiling (docs/training.md)
    compile: bool = False
    checkpoint_every: int = 500  # steps
    eval_every_epochs: int = 0  # 0: evaluate only at the end
    log_every: int = 10
    freeze_backbone: bool = False
    # Freeze the backbone's stem and stages up to stride 2**freeze_at (weights and BN statistics), as detectron2's
    # MODEL.BACKBONE.FREEZE_AT: their backward is skipped (docs/training.md); 0 trains every layer.
    freeze_at: int = 0
    sync_bn: bool = False
    num_workers: int = 2
    seed: int = 0
    backbone_weights: Optional[str] = "auto"  # auto | none | <path>: backbone init when no full checkpoint is given
    # Progressive learning (EfficientNetV2): N stages of equal epochs, image size and scale jitter growing to the full
    # ones (densekit/data/progressive.py); 1: every epoch at the full size.
    progressive_stages: int = 1
    progressive_min_size: float = 0.6  # the first stage's image (or crop) size, as a fraction of the full one
    progressive_min_jitter: float = 0.5  # the first stage's scale-jitter half-width, as a fraction of the full one
    # AdvProp (Xie et al. 2020): PGD adversarial copies of each batch through auxiliary BatchNorms, losses summed.
    advprop: bool = False
    advprop_steps: int = 1  # PGD iterations (paper: epsilon + 1, or 1 for epsilon 1)
    advprop_epsilon: float = 1.0  # L-inf radius on the 0-255 pixel scale (paper: 1-4)
    advprop_step_size: float = 1.0  # per iteration, 0-255 scale (paper: 1)
    # Experiment loggers (densekit/engine/loggers.py, the `loggers` extra): [] | [mlflow] | [wandb] | [mlflow,wandb]
    loggers: list[str] = field(default_factory=list)
    mlflow_uri: Optional[str] = None  # MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else file:<run dir>/mlruns
    experiment_name: Optional[str] = None  # MLflow experiment / W&B group; None: <model.name>_<data.name>
    run_name: Optional[str] = None  # None: <experiment name>/<run directory name>
    wandb_project: str = "densekit"


# Data schemas: the keys each dataset layout reads (densekit.tasks.base.DATA_LAYOUTS), with conf/data's defaults. The
# data YAMLs carry every key themselves (a layout is chosen by their keys, so they name no schema); these catch a
# typo'd or foreign key, in a YAML or a +data.<key>= override, which the dataset builders would silently not read.
_DATASETS = "${oc.env:DENSEKIT_DATASETS,datasets}"


@dataclass
class DataConfig:
    """Keys every data config has, whatever its format."""

    name: str = MISSING
    format: str = MISSING  # a data.format some task reads (densekit.tasks.get_task)
    train_split: str = "train"
    split: str = "val"  # the split tools/eval.py evaluates
    exif_orientation: bool = True  # decode images upright as EXIF declares; false: the stored frame
    skip_unreadable: bool = False  # leave out images that cannot be read instead of refusing to start


@dataclass
class DetectionAugmentConfig:
    hflip: float = 0.5
    scale_range: list[float] = field(default_factory=lambda: [0.1, 2.0])  # official EfficientDet scale jitter
    color_jitter: bool = False


@dataclass
class CocoDataConfig(DataConfig):
    """A COCO-format detection dataset, whatever its layout."""

    image_size: Optional[int] = None  # training / evaluation resolution; None: the model's own image_size
    decoder: str = "opencv"  # opencv | torchvision | pil
    corruption: Optional[str] = None  # evaluation images corrupted: gaussian_noise | gaussian_blur
    corruption_severity: int = 3  # 1-5, ImageNet-C's levels
    augment: DetectionAugmentConfig = field(default_factory=DetectionAugmentConfig)


@dataclass
class CocoRootDataConfig(CocoDataConfig):
    """COCO 2017 in the official layout under ``root`` (conf/data/coco.yaml)."""

    root: str = f"{_DATASETS}/coco"
    generate: bool = False


@dataclass
class SyntheticCocoDataConfig(CocoRootDataConfig):
    """The synthetic shapes, generated under ``root`` on first use (conf/data/synthetic.yaml)."""

    root: str = f"{_DATASETS}/synthetic_shapes"
    generate: bool = True
    num_train: int = 400
    num_val: int = 50
    image_size: Optional[int] = 256
    augment: DetectionAugmentConfig = field(default_factory=lambda: DetectionAugmentConfig(scale_range=[0.6, 1.4]))


@dataclass
class CocoFilesDataConfig(CocoDataConfig):
    """One's own COCO json and image folder per split, by path (conf/data/custom.yaml)."""

    train_images: Optional[str] = None
    train_annotations: Optional[str] = None
    val_images: Optional[str] = None
    val_annotations: Optional[str] = None
    test_images: Optional[str] = None
    test_annotations: Optional[str] = None


@dataclass
class SegAugmentConfig:
    hflip: float = 0.5
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    color_jitter: bool = True


@dataclass
class SegDataConfig(DataConfig):
    """A semantic segmentation dataset, whatever its layout."""

    crop_size: list[int] = field(default_factory=lambda: [512, 1024])  # training crop (H, W)
    eval_size: Optional[list[int]] = None  # None: full resolution; [H, W] resizes the image (labels stay full-size)
    eval_scales: list[float] = field(default_factory=lambda: [1.0])  # multi-scale evaluation
    eval_flip: bool = False
    write_predictions: bool = False  # write predicted label PNGs
    augment: SegAugmentConfig = field(default_factory=SegAugmentConfig)


@dataclass
class CityscapesDataConfig(SegDataConfig):
    """Cityscapes fine annotations in the official layout under ``root`` (conf/data/cityscapes.yaml)."""

    root: str = f"{_DATASETS}/cityscapes"
    generate: bool = False


@dataclass
class SyntheticCityscapesDataConfig(CityscapesDataConfig):
    """Synthetic street scenes in Cityscapes' layout, generated on first use (conf/data/synthetic_cityscapes.yaml)."""

    root: str = f"{_DATASETS}/synthetic_cityscapes"
    generate: bool = True
    num_train: int = 200
    num_val: int = 40
    synthetic_size: list[int] = field(default_factory=lambda: [128, 256])
    crop_size: list[int] = field(default_factory=lambda: [128, 256])
    augment: SegAugmentConfig = field(
        default_factory=lambda: SegAugmentConfig(scale_range=[0.75, 1.5], color_jitter=False)
    )


@dataclass
class SegFolderDataConfig(SegDataConfig):
    """One's own images + label PNGs per split, by path (conf/data/custom_seg.yaml)."""

    classes: Any = None  # a list of names, or a text file with one name per line
    train_images: Optional[str] = None
    train_labels: Optional[str] = None
    val_images: Optional[str] = None
    val_labels: Optional[str] = None
    test_images: Optional[str] = None
    test_labels: Optional[str] = None  # None for a split without labels: predictions only
    image_suffix: Optional[str] = None  # e.g. .jpg; None: any common image type
    label_suffix: str = ".png"
    ignore_index: int = 255  # label value of unlabelled pixels
    reduce_zero_label: bool = False  # ADE20K: 0 is "other" (ignored) and class i is stored as i + 1
    crop_size: list[int] = field(default_factory=lambda: [512, 512])
    augment: SegAugmentConfig = field(default_factory=lambda: SegAugmentConfig(color_jitter=False))


def image_size_arg(value: Any, default: Sequence[int]) -> tuple[int, int]:
    """A command line's ``image_size`` override as ``(H, W)``.

    Args:
        value: ``None`` (use ``default``), an int (a square input) or a pair ``[H, W]``.
        default: The model config's ``image_size``, used when ``value`` is ``None``.

    Returns:
        ``(H, W)`` as ints.

    Raises:
        ValueError: ``value`` (or ``default``) is neither an int nor a pair; the tools report it in one line.
    """
    if value is None:
        value = default
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple, ListConfig)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"image_size must be an int or [H, W], got {value!r}")


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore, so YAML files can extend them and every schema key can be
    overridden from the command line (``model.postprocess.soft_nms=true``) without a ``+``."""
    from hydra.core.config_store import ConfigStore

    from .modeling.build import META_ARCHS, schema_node  # late: the model modules register their schemas

    cs = ConfigStore.instance()
    for arch in META_ARCHS:
        cs.store(group="model", name=schema_node(arch), node=META_ARCHS.get(arch).schema)
    cs.store(group="train", name="_schema", node=TrainConfig)


def as_overrides(keys: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``{"train": {"epochs": 3}, "model": "efficientdet_d0"}`` -> ``["train.epochs=3", "model=efficientdet_d0"]``, as on
    a Hydra command line."""
    out: list[str] = []
    for key, value in keys.items():
        if isinstance(value, Mapping):
            out += as_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={_hydra_value(value)}")
    return out


def _hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return str(value)


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``: every leaf under its dotted key (empty mappings are leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
