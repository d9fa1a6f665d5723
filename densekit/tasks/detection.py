"""Object detection: COCO-format data, EfficientDet models, COCO AP through pycocotools."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.checks import unreadable_policy
from ..data.coco import CocoDetection, coco_paths
from ..data.corruptions import corrupting
from ..data.progressive import Stage, stage_scale_range, stage_size
from ..data.synthetic import ensure_synthetic_coco, synthetic_coco_paths
from ..config import CocoFilesDataConfig, CocoRootDataConfig, SyntheticCocoDataConfig, image_size_arg
from ..data.transforms import build_eval_transform, build_train_transform, keep_original_size
from ..deploy.onnx import detection_export_module
from ..deploy.predictions import DetectionInference
from ..evaluation.loop import Evaluation, evaluate_detector
from ..labels import COCO_ID_HEAD, class_names_of
from ..utils import PAPER, count_macs, count_parameters, format_count
from .base import TASKS, DataLayout, EvaluateFn, Task, data_layout, register_data_layout, skipped_note



#: Category id of a model label that the evaluated dataset does not have (see :func:`label_map_for_model`).
NOT_IN_DATASET = -1


def input_size(data_cfg: Any, model_cfg: Any) -> int:
    """Square training / evaluation resolution: ``data.image_size`` or else the model's."""
    if data_cfg.get("image_size"):
        return int(data_cfg.image_size)
    h, w = model_cfg.image_size
    if h != w:
        raise ValueError(f"model.image_size {list(model_cfg.image_size)} is not square; set data.image_size")
    return int(h)


def fill_of(pixel_mean: Any) -> dict[str, tuple[int, ...]]:
    """Transform padding in 0-255 units from a model's ``pixel_mean`` (0-1 units): padded pixels normalise to zero."""
    return {} if pixel_mean is None else {"fill": tuple(round(255 * m) for m in pixel_mean)}


def _files_by_path(data_cfg: Any, split: str) -> tuple[Path, Path]:
    """``data.<split>_images`` / ``data.<split>_annotations``, as in ``conf/data/custom.yaml``."""
    images, annotations = data_cfg.get(f"{split}_images"), data_cfg.get(f"{split}_annotations")
    if not images or not annotations:
        raise ValueError(
            f"data={data_cfg.name}: split {split!r} needs data.{split}_images (the image folder) and "
            f"data.{split}_annotations (its COCO json), e.g. data.{split}_images=/data/images "
            f"data.{split}_annotations=/data/{split}.json"
        )
    return Path(images).expanduser(), Path(annotations).expanduser()


def _synthetic_files(data_cfg: Any, split: str) -> tuple[Path, Path]:
    """The synthetic shapes under ``data.root``, generated there on first use."""
    root = Path(data_cfg.root)
    ensure_synthetic_coco(root, num_train=data_cfg.get("num_train", 400), num_val=data_cfg.get("num_val", 50))
    return synthetic_coco_paths(root, split)


def _official_files(data_cfg: Any, split: str) -> tuple[Path, Path]:
    return coco_paths(Path(data_cfg.root), split)


def _by_path(data_cfg: Any) -> bool:
    """Whether a COCO data config names its files by path: any ``*_images`` / ``*_annotations`` key (a typo'd one
    too, so that the key check then names it next to the keys it resembles)."""
    return any(str(key).endswith(("_images", "_annotations")) for key in data_cfg)


#: The layouts of COCO-format data, registered in DATA_LAYOUTS.
COCO_LAYOUTS = tuple(register_data_layout(layout) for layout in (
    DataLayout("coco_files", "coco", "a COCO json + image folder per split, by path", CocoFilesDataConfig,
               selects=_by_path, build=_files_by_path),
    DataLayout("synthetic_coco", "coco", "the synthetic shapes, generated under data.root", SyntheticCocoDataConfig,
               selects=lambda d: not _by_path(d) and bool(d.get("generate", False)), build=_synthetic_files),
    DataLayout("coco", "coco", "COCO's official layout under data.root", CocoRootDataConfig,
               selects=lambda d: not _by_path(d) and not d.get("generate", False), build=_official_files),
))


def coco_split_files(data_cfg: Any, split: str) -> tuple[Path, Path]:
    """Image folder and annotation json of ``split``, found by the data config's COCO layout (:data:`DATA_LAYOUTS`):
    given by path (``data.<split>_images`` / ``data.<split>_annotations``), the synthetic dataset, or COCO's official
    layout under ``data.root``."""
    return data_layout(data_cfg, "coco").build(data_cfg, split)


def build_coco_dataset(data_cfg: Any, split: str, image_size: int, train: bool, pixel_mean: Any = None,
                       original_size: bool = False) -> CocoDetection:
    """A COCO-format dataset for ``split`` with the train or eval transform at ``image_size`` (``original_size``:
    evaluation images at their own size, for sliced inference).

    The synthetic dataset is generated under ``data.root`` on first use when ``data.generate`` is set.
    """
    image_dir, ann_file = coco_split_files(data_cfg, split)
    aug = data_cfg.augment
    eval_transform = keep_original_size if original_size else build_eval_transform(image_size, **fill_of(pixel_mean))
    transform = (
        build_train_transform(
            image_size, scale_range=tuple(aug.scale_range), hflip=aug.hflip, color_jitter=aug.color_jitter, **fill_of(pixel_mean)
        )
        if train
        # Robustness evaluation: data.corruption (gaussian_noise | gaussian_blur) on the original eval images.
        else corrupting(eval_transform, data_cfg)
    )
    return CocoDetection(image_dir, ann_file, transform=transform, train=train, decoder=data_cfg.get("decoder", "opencv"),
                         exif=bool(data_cfg.get("exif_orientation", True)),
                         unreadable=unreadable_policy(data_cfg, train))


def label_map_for_model(dataset: CocoDetection, num_classes: int) -> list[int]:
    """Model label -> dataset category id, :data:`NOT_IN_DATASET` for labels the dataset has no category for.

    A head trained on this dataset has one output per category (contiguous labels). A 90-class head (the public
    COCO checkpoints) predicts category ``id`` as label ``id - 1``; on COCO 2017 (80 of those ids) the other ten
    labels are not in the dataset, and evaluation drops them before keeping each image's best detections.
    Anything else cannot be scored on this dataset.
    """
    if num_classes == dataset.num_classes:
        return list(dataset.label_to_cat_id)
    if num_classes == COCO_ID_HEAD and max(dataset.label_to_cat_id, default=0) <= COCO_ID_HEAD:
        known = set(dataset.label_to_cat_id)
        return [cat if cat in known else NOT_IN_DATASET for cat in range(1, COCO_ID_HEAD + 1)]
    raise ValueError(
        f"the model has {num_classes} classes but {dataset.ann_file} has {dataset.num_classes} categories "
        f"(ids {dataset.label_to_cat_id[:10]}...); train with model.num_classes={dataset.num_classes}, or fine-tune "
        f"from the checkpoint: weights=<it> loads everything but the class predictor"
    )


def versus(ours: float, paper: float | None, scale: float, suffix: str, spec: str) -> str:
    """``"3.9M (-0.5%)"``: the paper's number, printed as precisely as it is published, and ours relative to it."""
    if paper is None:
        return "-"
    return f"{paper / scale:{spec}}{suffix} ({(ours - paper) / paper * 100:+.1f}%)"


class DetectionTask(Task):
    """Boxes and classes: COCO json + images in, COCO AP out."""

    name = "detection"
    arch = "efficientdet"
    data_formats = tuple(dict.fromkeys(layout.format for layout in COCO_LAYOUTS))

    def build_dataset(self, cfg: Any, split: str, train: bool, original_size: bool = False) -> CocoDetection:
        """See :meth:`Task.build_dataset`; ``original_size``: evaluation images at their own size (sliced inference
        tiles them itself)."""
        size = input_size(cfg.data, cfg.model)
        return build_coco_dataset(cfg.data, split, size, train=train, pixel_mean=cfg.model.pixel_mean,
                                  original_size=original_size)

    def stage_overrides(self, cfg: Any, stage: Stage, multiple: int) -> tuple[dict[str, Any], str]:
        size = stage_size(input_size(cfg.data, cfg.model), stage.size_fraction, multiple)
        scale = stage_scale_range(cfg.data.augment.scale_range, stage.jitter_fraction)
        description = f"({size} px, scale jitter {scale[0]:.2f}-{scale[1]:.2f})"
        return {"image_size": size, "augment": {"scale_range": scale}}, description

    def num_classes(self, dataset: CocoDetection) -> int:
        return int(dataset.num_classes)

    def class_names(self, dataset: CocoDetection) -> list[str]:
        return list(dataset.class_names)

    def check_model_fits_data(self, model: nn.Module, dataset: CocoDetection) -> None:
        label_map_for_model(dataset, model.num_classes)

    def make_evaluate(self, cfg: Any, dataset: CocoDetection, loader: DataLoader, device: torch.device, out_dir: Path) -> EvaluateFn:
        # Evaluation: plain calls score only; .final (densekit eval, the end of training) writes eval.plots' plots too.
        return Evaluation(lambda model, plots: evaluate_detector(
            model, dataset, loader, device, out_dir, cfg.data.split, cfg.model.name,
            label_map_for_model(dataset, model.num_classes),
            score_threshold=cfg.eval.score_threshold, visualize=cfg.eval.visualize, plots=plots,
        ), plots=bool(cfg.eval.get("plots", False)))

    def headline(self, metrics: dict[str, Any]) -> str:
        nan = float("nan")
        ap = "  ".join(f"{name} {metrics.get(name, nan):.3f}" for name in ("AP", "AP50", "AP75"))
        return ap + skipped_note(metrics)

    def summary(self, model: nn.Module, size: tuple[int, int]) -> str:
        cfg = model.config
        paper = PAPER.get(cfg.name)
        neck = cfg.neck
        lines = [
            f"model     {cfg.name}  ({cfg.arch}, {cfg.num_classes} classes, act {cfg.act})",
            f"backbone  {cfg.backbone.name}: levels {', '.join(f'P{s.level} ({s.channels} ch)' for s in model.backbone.feature_specs)}",
            f"neck      BiFPN P{neck.min_level}-P{neck.max_level}, {neck.channels} ch x {neck.repeats} repeats, "
            f"fusion {neck.fusion}",
            f"head      {cfg.head.repeats} repeats (class and box nets)",
            "",
            f"{'parameters':<22}{'densekit':>14}   paper",
        ]
        parts = {"backbone": model.backbone, "neck": model.neck, "head": model.head}
        counts = {part: count_parameters(module) for part, module in parts.items()}
        total = count_parameters(model)
        lines += [f"  {part:<20}{n:>14,}   -" for part, n in counts.items()]
        if total != sum(counts.values()):
            lines.append(f"  {'other':<20}{total - sum(counts.values()):>14,}   -")
        lines.append(f"  {'total':<20}{total:>14,}   {versus(total, paper.params if paper else None, 1e6, 'M', '.1f')}")
        with torch.no_grad():
            cls_out, box_out = model.forward_raw(torch.zeros(1, 3, *size, device=next(model.parameters()).device))
        return "\n".join(lines + self._macs_lines(model, size, paper) + self._level_lines(model, cls_out, box_out))

    @staticmethod
    def _macs_lines(model: nn.Module, size: tuple[int, int], paper: Any) -> list[str]:
        cfg = model.config
        macs = count_macs(model, size)
        run = model.padded_size(size)  # the input is padded to a multiple of the backbone's stride
        at_config = list(size) == list(cfg.image_size)
        size_note = "the config's" if at_config else f"config: {cfg.image_size[0]}x{cfg.image_size[1]}"
        padded = f", padded to {run[0]}x{run[1]} (a multiple of {model.size_divisor})" if run != tuple(size) else ""
        paper_macs = paper.macs if paper and at_config else None  # the paper's MACs hold at its own input size only
        return [
            f"{'MACs':<22}{format_count(macs):>14}   {versus(macs, paper_macs, 1e9, 'B', '.3g')}",
            f"  input {size[0]}x{size[1]} ({size_note}){padded}",
        ]

    @staticmethod
    def _level_lines(model: nn.Module, cls_out: list[torch.Tensor], box_out: list[torch.Tensor]) -> list[str]:
        cfg = model.config
        per_location = model.anchor_generator.num_anchors
        locations = sum(t.shape[-2] * t.shape[-1] for t in cls_out)
        lines = [
            f"anchors   {per_location} per location ({cfg.anchors.num_scales} scales x {len(cfg.anchors.aspect_ratios)} "
            f"aspect ratios), {per_location * locations:,} in total, anchor_scale {cfg.anchors.anchor_scale:g}",
            "",
            f"{'level':<7}{'stride':>6}  {'feature HxW':<13}{'class logits':<22}box regression",
        ]
        for level, (c, b) in enumerate(zip(cls_out, box_out), start=cfg.neck.min_level):
            lines.append(
                f"P{level:<6}{2 ** level:>6}  {f'{c.shape[-2]}x{c.shape[-1]}':<13}{str(list(c.shape)):<22}{list(b.shape)}"
            )
        return lines


    def export_module(self, model: nn.Module, image_size: tuple[int, int], postprocess: bool) -> tuple[nn.Module, list[str]]:
        return detection_export_module(model, image_size, postprocess)

    def inference(self, model_cfg: Any, image_size: Any, score_threshold: float) -> DetectionInference:
        h, w = image_size_arg(image_size, model_cfg.image_size)
        if h != w:
            raise ValueError(f"a detector's input is square (its evaluation transform pads to one); got image_size {h}x{w}")
        transform = build_eval_transform(h, **fill_of(model_cfg.pixel_mean))
        return DetectionInference(transform, class_names_of(model_cfg), score_threshold)


TASKS.register(DetectionTask.name)(DetectionTask())
