"""Print a one-screen summary of a model: parameters per part, MACs, anchors and the output levels.

Usage::

    python tools/summary.py model=efficientdet_d3
    python tools/summary.py model=efficientdet_lite0 image_size=[512,512]

The model is built on the meta device (shapes, no weights), so even D7x summarises in about a second.
"""
from __future__ import annotations

import logging
import sys

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

import densekit
from densekit.config import image_size_arg
from densekit.utils import PAPER, count_macs, count_parameters, format_count

log = logging.getLogger(__name__)


def build_shapes_only(model_cfg: DictConfig) -> nn.Module:
    """Build on the meta device when possible: no weight initialisation, no memory, instant for big models."""
    try:
        with torch.device("meta"):
            return densekit.build_model(model_cfg)
    except (NotImplementedError, RuntimeError) as err:  # e.g. a backbone that loads weights while building
        log.info("building on the meta device failed (%s); building on the CPU", err)
        return densekit.build_model(model_cfg)


def versus(ours: float, paper: float | None, scale: float, suffix: str, spec: str) -> str:
    """``"3.9M (-0.5%)"``: the paper's number, printed as precisely as it is published, and ours relative to it."""
    if paper is None:
        return "-"
    return f"{paper / scale:{spec}}{suffix} ({(ours - paper) / paper * 100:+.1f}%)"


def summarize(model: nn.Module, size: tuple[int, int]) -> str:
    """The summary text of a densekit detector for an input of ``size`` (H, W)."""
    cfg = model.config
    paper = PAPER.get(cfg.name)
    specs = model.backbone.feature_specs
    neck, head = cfg.neck, cfg.head
    lines = [
        f"model     {cfg.name}  ({cfg.arch}, {cfg.num_classes} classes, act {cfg.act})",
        f"backbone  {cfg.backbone.name}: levels {', '.join(f'P{s.level} ({s.channels} ch)' for s in specs)}",
        f"neck      BiFPN P{neck.min_level}-P{neck.max_level}, {neck.channels} ch x {neck.repeats} repeats, "
        f"fusion {neck.fusion}",
        f"head      {head.repeats} repeats (class and box nets)",
        "",
        f"{'parameters':<22}{'densekit':>14}   paper",
    ]
    parts = {"backbone": model.backbone, "neck": model.neck, "head": model.head}
    counts = {part: count_parameters(module) for part, module in parts.items()}
    total = count_parameters(model)
    for part, n in counts.items():
        lines.append(f"  {part:<20}{n:>14,}   -")
    if total != sum(counts.values()):
        lines.append(f"  {'other':<20}{total - sum(counts.values()):>14,}   -")
    lines.append(f"  {'total':<20}{total:>14,}   {versus(total, paper.params if paper else None, 1e6, 'M', '.1f')}")

    with torch.no_grad():
        x = torch.zeros(1, 3, *size, device=next(model.parameters()).device)
        cls_out, box_out = model.forward_raw(x)
    macs = count_macs(model, size)
    divisor = getattr(model, "size_divisor", 1)  # densekit's EfficientDet pads its input to a multiple of this (the backbone stride)
    run = tuple(-(-n // divisor) * divisor for n in size)
    at_config = list(size) == list(cfg.image_size)
    size_note = "the config's" if at_config else f"config: {cfg.image_size[0]}x{cfg.image_size[1]}"
    padded = f", padded to {run[0]}x{run[1]} (a multiple of {divisor})" if run != size else ""
    paper_macs = paper.macs if paper and at_config else None  # the paper's MACs hold at its own input size only
    lines += [
        f"{'MACs':<22}{format_count(macs):>14}   {versus(macs, paper_macs, 1e9, 'B', '.3g')}",
        f"  input {size[0]}x{size[1]} ({size_note}){padded}",
    ]
    per_location = model.anchor_generator.num_anchors
    locations = sum(t.shape[-2] * t.shape[-1] for t in cls_out)
    lines += [
        f"anchors   {per_location} per location ({cfg.anchors.num_scales} scales x {len(cfg.anchors.aspect_ratios)} "
        f"aspect ratios), {per_location * locations:,} in total, anchor_scale {cfg.anchors.anchor_scale:g}",
        "",
        f"{'level':<7}{'stride':>6}  {'feature HxW':<13}{'class logits':<22}box regression",
    ]
    for level, (c, b) in enumerate(zip(cls_out, box_out), start=neck.min_level):
        lines.append(
            f"P{level:<6}{2 ** level:>6}  {f'{c.shape[-2]}x{c.shape[-1]}':<13}{str(list(c.shape)):<22}{list(b.shape)}"
        )
    return "\n".join(lines)


def summarize_segmenter(model: nn.Module, size: tuple[int, int]) -> str:
    """The summary text of a densekit segmenter (ESeg, LR-ASPP) for an input of ``size`` (H, W)."""
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


@hydra.main(config_path="../conf", config_name="summary", version_base=None)
def main(cfg: DictConfig) -> None:
    """Entry point: build ``cfg.model`` and print its summary."""
    model = build_shapes_only(cfg.model).eval()
    try:
        size = image_size_arg(cfg.image_size, model.config.image_size)
    except ValueError as err:  # a command-line mistake: one line, no traceback
        sys.exit(str(err))
    print(summarize_segmenter(model, size) if model.config.arch == "segmenter" else summarize(model, size))


if __name__ == "__main__":
    main()
