"""Print the segmentation models as a markdown table: parameters, MACs and CPU latency at 1024x2048, with the paper's.

Usage::

    HF_HUB_OFFLINE=1 python tools/seg_model_table.py                  # every segmentation model, with latency
    HF_HUB_OFFLINE=1 python tools/seg_model_table.py --iters 0        # parameters and MACs only (seconds)
    HF_HUB_OFFLINE=1 python tools/seg_model_table.py eseg_lite_s      # some models

MACs are counted on the meta device (``densekit.utils.count_macs``, one ``forward_raw``). Latency is the eval-mode
call ``model(images)`` (normalise, network, bilinear upsampling, argmax) on randomly initialised weights at batch 1
under ``torch.inference_mode``, after warm-up (the first calls at a new shape pay for oneDNN's kernel selection):
the median and the fastest of ``--iters`` runs. On a shared machine the fastest is the better estimate of the model's
own cost; the median shows what a loaded machine gives.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import torch

import densekit
from densekit.utils import count_macs, count_parameters

# Extra rows beside the conf/model entries: the paper's LR-ASPP halves the last stage ("RF2"), torchvision does not.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lraspp_mobilenet_v3_large (RF2)": ("lraspp_mobilenet_v3_large", {"backbone": {"reduced_tail": True}}),
    "lraspp_mobilenet_v3_small (RF2)": ("lraspp_mobilenet_v3_small", {"backbone": {"reduced_tail": True}}),
}

# Published Cityscapes numbers. LR-ASPP: Howard et al. 2019, Tables 7/8 (OS16, RF2, MACs at 1024x2048).
# ESeg: Meng et al. 2022 (abstract); GPU FPS at 1024x2048. densekit's ESeg family is a reconstruction (see yamls).
PAPER: dict[str, str] = {
    "lraspp_mobilenet_v3_large (RF2)": "72.36 val / 72.6 test mIoU; 9.74B MACs",
    "lraspp_mobilenet_v3_small (RF2)": "68.38 val / 69.4 test mIoU; 2.90B MACs",
    "lraspp_mobilenet_v3_large": "torchvision: 3,221,538 params (21 classes)",
    "eseg_lite_s": "76.0 mIoU at 189 FPS",
    "eseg_lite_l": "80.1 mIoU at 79 FPS",
}


def seg_models() -> list[str]:
    """The segmentation entries of ``conf/model`` (LR-ASPP, ESeg-Lite S/M/L, ESeg S/M/L), then the RF2 variants."""

    def order(name: str) -> tuple[int, int, str]:
        family = 0 if name.startswith("lraspp") else 1 if name.startswith("eseg_lite") else 2
        return family, {"s": 0, "m": 1, "l": 2}.get(name.rsplit("_", 1)[-1], 0), name

    names = densekit.list_models(arch="segmenter")
    return sorted(names, key=order) + list(VARIANTS)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def build(row: str, device: str | torch.device) -> torch.nn.Module:
    """The model of a table row (a ``conf/model`` name or a :data:`VARIANTS` key), in eval mode."""
    name, overrides = VARIANTS.get(row, (row, {}))
    with torch.device(device):
        return densekit.create_model(name, **overrides).eval()


def cpu_latency_ms(model: torch.nn.Module, size: tuple[int, int], warmup: int, iters: int) -> tuple[float, float]:
    """Median and fastest wall time of ``model(images)`` at batch 1, in milliseconds."""
    x = torch.rand(1, 3, *size)
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def describe(cfg: Any) -> tuple[str, str]:
    """``(neck, head)`` columns of a resolved config."""
    n = cfg.neck
    neck = "-" if n is None else f"BiFPN P{n.min_level}-P{n.max_level}, {n.channels} x {n.repeats}"
    if cfg.head.type == "lraspp":
        return neck, f"LR-ASPP {cfg.head.channels or 128}"
    return neck, f"ESeg {cfg.head.channels or cfg.neck.channels} x {cfg.head.repeats}"


def rows(names: list[str], size: tuple[int, int], warmup: int, iters: int) -> list[str]:
    """Markdown table lines for ``names``."""
    out = [
        f"| model | backbone | neck | head | act | params | MACs {size[0]}x{size[1]} "
        "| CPU ms median | CPU ms best | paper |",
        "|---|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for row in names:
        meta = build(row, "meta")
        cfg = meta.config
        backbone = cfg.backbone.name + (" (reduced tail)" if cfg.backbone.reduced_tail else "")
        latency = ["-", "-"]
        if iters > 0:
            latency = [f"{t:,.0f}" for t in cpu_latency_ms(build(row, "cpu"), size, warmup, iters)]
        cells = [
            row,
            backbone,
            *describe(cfg),
            cfg.act if cfg.head.type == "eseg" else "relu / hardswish",
            f"{count_parameters(meta):,}",
            f"{count_macs(meta, size) / 1e9:.2f}B",
            *latency,
            PAPER.get(row, "-"),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main() -> None:
    """Entry point: print the machine, then the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="rows (default: every segmentation model and the RF2 variants)")
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="timed runs per model; 0 skips the latency columns")
    args = parser.parse_args()
    print(
        f"<!-- {cpu_name()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, warm-up {args.warmup}, {args.iters} timed runs -->"
    )
    print("\n".join(rows(args.models or seg_models(), tuple(args.size), args.warmup, args.iters)))


if __name__ == "__main__":
    main()
