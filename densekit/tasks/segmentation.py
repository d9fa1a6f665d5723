"""Semantic segmentation: Cityscapes-layout data or one's own image + label PNG folders, ESeg / LR-ASPP segmenters,
mIoU equal to cityscapesscripts'."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import CityscapesDataConfig, SegFolderDataConfig, SyntheticCityscapesDataConfig, image_size_arg
from ..data.checks import unreadable_policy
from ..data.cityscapes import CityscapesSegmentation
from ..data.progressive import Stage, stage_scale_range, stage_size
from ..data.seg_folder import SegmentationFolder, read_class_names
from ..data.seg_transforms import build_seg_eval_transform, build_seg_train_transform
from ..data.synthetic_cityscapes import ensure_synthetic_cityscapes
from ..deploy.onnx import segmentation_export_module
from ..deploy.predictions import SegmentationInference
from ..evaluation.loop import Evaluation, evaluate_segmenter
from ..labels import class_names_of
from ..utils import count_macs, count_parameters, format_count
from .base import TASKS, DataLayout, EvaluateFn, Task, data_layout, register_data_layout, skipped_note
from .detection import fill_of


def build_cityscapes_dataset(data_cfg: Any, split: str, train: bool, pixel_mean: Any = None) -> CityscapesSegmentation:
    """A Cityscapes-layout dataset for ``split``: random scale / crop / flip in training, full resolution in eval.

    The synthetic Cityscapes is generated under ``data.root`` on first use when ``data.generate`` is set.
    """
    if data_cfg.get("generate", False):
        ensure_synthetic_cityscapes(
            data_cfg.root, num_train=data_cfg.num_train, num_val=data_cfg.num_val, size=tuple(data_cfg.synthetic_size)
        )
    return CityscapesSegmentation(data_cfg.root, split, transform=_seg_transform(data_cfg, train, pixel_mean),
                                  exif=_exif_of(data_cfg), unreadable=unreadable_policy(data_cfg, train))


def build_seg_folder_dataset(data_cfg: Any, split: str, train: bool, pixel_mean: Any = None) -> SegmentationFolder:
    """One's own images + label PNGs + class list (``conf/data/custom_seg.yaml``), with the same transforms."""
    if not data_cfg.get("classes"):
        raise ValueError(f"data={data_cfg.name}: set data.classes to a list of class names or a text file (one per line)")
    images = data_cfg.get(f"{split}_images")
    if not images:
        raise ValueError(
            f"data={data_cfg.name}: split {split!r} needs data.{split}_images (the image folder) and "
            f"data.{split}_labels (its label PNGs; null for a split without labels)"
        )
    labels = data_cfg.get(f"{split}_labels")
    if labels is None and train:
        raise ValueError(f"data={data_cfg.name}: training needs data.{split}_labels (the folder of label PNGs)")
    return SegmentationFolder(
        images, labels, read_class_names(data_cfg.classes), ignore_index=int(data_cfg.ignore_index),
        reduce_zero_label=bool(data_cfg.reduce_zero_label), image_suffix=data_cfg.get("image_suffix"),
        label_suffix=data_cfg.label_suffix, transform=_seg_transform(data_cfg, train, pixel_mean),
        exif=_exif_of(data_cfg), unreadable=unreadable_policy(data_cfg, train),
    )


def _exif_of(data_cfg: Any) -> bool:
    """``data.exif_orientation``: images in their displayed frame (default, as detection), or the stored one."""
    return bool(data_cfg.get("exif_orientation", True))


def _seg_transform(data_cfg: Any, train: bool, pixel_mean: Any) -> Any:
    """Random scale / crop / flip in training; the full image (or ``data.eval_size``) in evaluation."""
    if train:
        aug = data_cfg.augment
        return build_seg_train_transform(
            crop_size=tuple(data_cfg.crop_size), scale_range=tuple(aug.scale_range), hflip=aug.hflip,
            color_jitter=aug.color_jitter, **fill_of(pixel_mean),
        )
    size = data_cfg.get("eval_size")
    return build_seg_eval_transform(tuple(size) if size else None)


def _generated(data_cfg: Any) -> bool:
    return bool(data_cfg.get("generate", False))


#: The layouts of the formats this task reads, registered in DATA_LAYOUTS.
SEG_LAYOUTS = tuple(register_data_layout(layout) for layout in (
    DataLayout("cityscapes", "cityscapes", "Cityscapes' official layout under data.root", CityscapesDataConfig,
               selects=lambda d: not _generated(d), build=build_cityscapes_dataset),
    DataLayout("synthetic_cityscapes", "cityscapes", "synthetic street scenes in the Cityscapes layout, generated "
               "under data.root", SyntheticCityscapesDataConfig, selects=_generated, build=build_cityscapes_dataset),
    DataLayout("seg_folder", "seg_folder", "images + label PNGs per split, by path", SegFolderDataConfig,
               selects=lambda d: True, build=build_seg_folder_dataset),
))


class SegmentationTask(Task):
    """A class per pixel: images + label PNGs in, mIoU and per-class IoU out."""

    name = "segmentation"
    arch = "segmenter"
    data_formats = tuple(dict.fromkeys(layout.format for layout in SEG_LAYOUTS))

    def build_dataset(self, cfg: Any, split: str, train: bool) -> CityscapesSegmentation | SegmentationFolder:
        build = data_layout(cfg.data).build
        return build(cfg.data, split, train=train, pixel_mean=cfg.model.pixel_mean)

    def stage_overrides(self, cfg: Any, stage: Stage, multiple: int) -> tuple[dict[str, Any], str]:
        crop = [stage_size(int(side), stage.size_fraction, multiple) for side in cfg.data.crop_size]
        scale = stage_scale_range(cfg.data.augment.scale_range, stage.jitter_fraction)
        description = f"({crop[0]}x{crop[1]} crops, scale jitter {scale[0]:.2f}-{scale[1]:.2f})"
        return {"crop_size": crop, "augment": {"scale_range": scale}}, description

    def num_classes(self, dataset: CityscapesSegmentation | SegmentationFolder) -> int:
        return int(dataset.num_classes)

    def class_names(self, dataset: CityscapesSegmentation) -> list[str]:
        return list(dataset.class_names)

    def check_model_fits_data(self, model: nn.Module, dataset: CityscapesSegmentation) -> None:
        if model.num_classes != self.num_classes(dataset):
            raise ValueError(f"model has {model.num_classes} classes, {dataset} has {self.num_classes(dataset)}")

    def make_evaluate(
        self, cfg: Any, dataset: CityscapesSegmentation, loader: DataLoader, device: torch.device, out_dir: Path
    ) -> EvaluateFn:
        # Evaluation: plain calls score only; .final (densekit eval, the end of training) writes eval.plots' plots too.
        return Evaluation(lambda model, plots: evaluate_segmenter(
            model, dataset, loader, device, out_dir, cfg.data.split,
            scales=tuple(cfg.data.get("eval_scales", [1.0])), flip=bool(cfg.data.get("eval_flip", False)),
            write_pngs=bool(cfg.data.get("write_predictions", False)), visualize=cfg.eval.visualize, plots=plots,
        ), plots=bool(cfg.eval.get("plots", False)))

    def headline(self, metrics: dict[str, Any]) -> str:
        return (f"mIoU {metrics['mIoU']:.3f}  pixel accuracy {metrics.get('pixel_acc', float('nan')):.3f}"
                + skipped_note(metrics))

    def summary(self, model: nn.Module, size: tuple[int, int]) -> str:
        cfg = model.config
        specs = model.backbone.feature_specs
        parts = {"backbone": model.backbone, "neck": model.neck, "head": model.head}
        neck = (
            f"BiFPN P{cfg.neck.min_level}-P{cfg.neck.max_level}, {cfg.neck.channels} ch x {cfg.neck.repeats} repeats, "
            f"fusion {cfg.neck.fusion}" if model.neck is not None else "none"
        )
        lines = [
            f"model     {cfg.name}  ({cfg.arch}, {cfg.num_classes} classes, ignore {cfg.ignore_index}, act {cfg.act})",
            f"backbone  {cfg.backbone.name}: levels {', '.join(f'P{s.level} (stride {s.stride}, {s.channels} ch)' for s in specs)}",
            f"neck      {neck}",
            f"head      {cfg.head.type}",
            "",
            f"{'parameters':<22}{'densekit':>14}",
        ]
        for part, module in parts.items():
            lines.append(f"  {part:<20}{count_parameters(module) if module is not None else 0:>14,}")
        lines.append(f"  {'total':<20}{count_parameters(model):>14,}")
        with torch.no_grad():
            logits = model.forward_raw(torch.zeros(1, 3, *size, device=next(model.parameters()).device))
        lines += [
            f"{'MACs':<22}{format_count(count_macs(model, size)):>14}",
            f"  input {size[0]}x{size[1]}, logits {list(logits.shape)}",
        ]
        return "\n".join(lines)


    def export_module(self, model: nn.Module, image_size: tuple[int, int], postprocess: bool) -> tuple[nn.Module, list[str]]:
        return segmentation_export_module(model, image_size, postprocess)

    def inference(self, model_cfg: Any, image_size: Any, score_threshold: float) -> SegmentationInference:
        """Full resolution by default, as the evaluation; ``score_threshold`` has no meaning for a label map."""
        size = None if image_size is None else image_size_arg(image_size, model_cfg.image_size)
        return SegmentationInference(build_seg_eval_transform(size), class_names_of(model_cfg), resized=size is not None)


TASKS.register(SegmentationTask.name)(SegmentationTask())
