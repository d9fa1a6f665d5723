"""Print the model zoo as a markdown table: parameters and MACs of densekit, effdet and the paper.

Usage::

    HF_HUB_OFFLINE=1 python tools/model_table.py > table.md

Every model is built on the meta device (shapes only), so the whole zoo takes seconds. effdet
(efficientdet-pytorch) columns are filled when it is installed; the paper publishes D0-D7x only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/ is not installed

import torch  # noqa: E402
from torch import nn  # noqa: E402

import densekit  # noqa: E402
from benchmarks.references import effdet_counterpart  # noqa: E402
from densekit.utils import PAPER, count_macs, count_parameters  # noqa: E402


def effdet_meta(name: str, image_size: list[int]) -> nn.Module | None:
    """effdet's model ``name`` on the meta device, or None if effdet is not installed."""
    try:
        from effdet import EfficientDet, get_efficientdet_config
    except ImportError:
        return None
    cfg = get_efficientdet_config(name)
    cfg.image_size = list(image_size)  # effdet fixes its BiFPN resampling sizes at construction
    with torch.device("meta"):
        return EfficientDet(cfg, pretrained_backbone=False)


def billions(n: float | None, published: bool = False) -> str:
    """``n`` in billions: two decimals for counts, three significant digits as the paper prints them."""
    if n is None:
        return "-"
    if published:
        return f"{n / 1e9:#.3g}".rstrip(".") + "B"
    return f"{n / 1e9:.2f}B"


def padded_note(model: nn.Module, size: list[int]) -> str:
    """`` (runs HxW)`` when densekit pads this input to a multiple of the backbone stride, else empty."""
    divisor = getattr(model, "size_divisor", 1)
    run = [-(-n // divisor) * divisor for n in size]
    return f" (runs {run[0]}x{run[1]})" if run != size else ""


def rows(names: list[str]) -> list[str]:
    """Markdown table lines for the models ``names``."""
    out = [
        "| model | params densekit | params effdet | params paper | MACs densekit | MACs effdet | MACs paper "
        "| input | backbone | BiFPN width x repeats | levels | head repeats | fusion |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|---|---|",
    ]
    for name in names:
        with torch.device("meta"):
            model = densekit.create_model(name)
        cfg = model.config
        size = list(cfg.image_size)
        effdet_name = effdet_counterpart(name)
        ref = effdet_meta(effdet_name, size) if effdet_name else None
        paper = PAPER.get(name)
        out.append(
            "| "
            + " | ".join(
                [
                    name,
                    f"{count_parameters(model):,}",
                    f"{count_parameters(ref):,}" if ref is not None else "-",
                    f"{paper.params / 1e6:.1f}M" if paper else "-",
                    billions(count_macs(model, size)),
                    billions(count_macs(ref, size)) if ref is not None else "-",
                    billions(paper.macs, published=True) if paper else "-",
                    f"{size[0]}x{size[1]}" + padded_note(model, size),
                    cfg.backbone.name,
                    f"{cfg.neck.channels} x {cfg.neck.repeats}",
                    f"P{cfg.neck.min_level}-P{cfg.neck.max_level}",
                    str(cfg.head.repeats),
                    cfg.neck.fusion,
                ]
            )
            + " |"
        )
    return out


def main() -> None:
    """Entry point: print the table for the given models (default: all of ``conf/model``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: every conf/model entry)")
    args = parser.parse_args()
    print("\n".join(rows(args.models or densekit.list_models(arch="efficientdet"))))


if __name__ == "__main__":
    main()
