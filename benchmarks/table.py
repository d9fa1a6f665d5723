"""Print one of the model tables of docs/ as markdown, chosen by ``table=``.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/table.py                                   # table=models: docs/models.md
    HF_HUB_OFFLINE=1 python benchmarks/table.py table=segmentation                # docs/segmentation.md
    HF_HUB_OFFLINE=1 python benchmarks/table.py table=segmentation table.iters=0  # its counts only (seconds)
    HF_HUB_OFFLINE=1 python benchmarks/table.py table=benchmarks                  # docs/benchmarks.md, all models, CPU
    HF_HUB_OFFLINE=1 python benchmarks/table.py table=benchmarks table.models=[efficientdet_d0,eseg_lite_s] table.iters=5
    HF_HUB_OFFLINE=1 python benchmarks/table.py table=benchmarks table.device=cuda table.precision=fp16 table.compile=true

* ``models``: parameters and MACs of every EfficientDet: densekit's, effdet's (filled when efficientdet-pytorch is
  installed) and the paper's (D0-D7x only). Every model is built on the meta device (shapes only): seconds.
* ``segmentation``: the segmenters with the paper's RF2 variants: parameters, MACs (on the meta device, one
  ``forward_raw``) and CPU latency at ``table.size``: the eval-mode call ``model(images)`` (normalise, network,
  bilinear upsampling, argmax) on random weights at batch 1 under ``torch.inference_mode``, after ``table.warmup``
  calls; the median and the fastest of ``table.iters``. On a shared machine the fastest is the better estimate of the
  model's own cost; the median shows what a loaded machine gives.
* ``benchmarks``: each row is one run of ``benchmarks/benchmark.py`` in its own process (so one model's memory or
  compiled kernels never affect the next), with BN folding and channels_last (densekit's optimised eager model;
  ``table.compile=true`` adds torch.compile with inductor freezing) at the model's native size: EfficientDet's
  ``image_size``, 1024x2048 for the Cityscapes segmenters. The ``command`` column is that exact command; run it to
  reproduce or extend a row. A model whose run fails gets a row that says so, and the table goes on.
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# A script's own folder heads sys.path: put the repository root first, so that `densekit` is this checkout's, not
# whichever copy is installed.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch import nn  # noqa: E402

import densekit  # noqa: E402
from densekit.benchmarks.benchmark import PRECISIONS  # noqa: E402
from densekit.benchmarks.references import NoReferenceError, effdet_counterpart, effdet_network  # noqa: E402
from densekit.benchmarks.timing import cpu_name, synchronizer, time_interleaved  # noqa: E402
from densekit.cli.errors import UsageError, reports_user_errors, run_tool  # noqa: E402
from densekit.config import image_size_arg, register_configs  # noqa: E402
from densekit.utils import PAPER, count_macs, count_parameters, format_count  # noqa: E402

# ---------------------------------------------------------------------------------------------- table=models


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


def effdet_meta(name: str | None, size: list[int]) -> nn.Module | None:
    """effdet's model ``name`` (90 classes) on the meta device; None without a counterpart or without effdet."""
    if name is None:
        return None
    try:
        with torch.device("meta"):
            return effdet_network(name, size)
    except NoReferenceError:  # effdet is not installed: its columns say "-"
        return None


def model_rows(names: list[str]) -> Iterator[str]:
    """Markdown table lines for the EfficientDet models ``names``."""
    yield (
        "| model | params densekit | params effdet | params paper | MACs densekit | MACs effdet | MACs paper "
        "| input | backbone | BiFPN width x repeats | levels | head repeats | fusion |"
    )
    yield "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|---|---|"
    for name in names:
        with torch.device("meta"):
            model = densekit.create_model(name)
        cfg = model.config
        size = list(cfg.image_size)
        ref = effdet_meta(effdet_counterpart(name), size)
        paper = PAPER.get(name)
        cells = [
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
        yield "| " + " | ".join(cells) + " |"


# ---------------------------------------------------------------------------------------------- table=segmentation

# Extra rows beside the conf/model entries: the paper's LR-ASPP halves the last stage ("RF2"), torchvision does not.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lraspp_mobilenet_v3_large (RF2)": ("lraspp_mobilenet_v3_large", {"backbone": {"reduced_tail": True}}),
    "lraspp_mobilenet_v3_small (RF2)": ("lraspp_mobilenet_v3_small", {"backbone": {"reduced_tail": True}}),
}

# Published Cityscapes numbers. LR-ASPP: Howard et al. 2019, Tables 7/8 (OS16, RF2, MACs at 1024x2048).
# ESeg: Meng et al. 2022 (abstract); GPU FPS at 1024x2048. densekit's ESeg family is a reconstruction (see yamls).
SEGMENTATION_PAPER: dict[str, str] = {
    "lraspp_mobilenet_v3_large (RF2)": "72.36 val / 72.6 test mIoU; 9.74B MACs",
    "lraspp_mobilenet_v3_small (RF2)": "68.38 val / 69.4 test mIoU; 2.90B MACs",
    "lraspp_mobilenet_v3_large": "torchvision: 3,221,538 params (21 classes)",
    "eseg_lite_s": "76.0 mIoU at 189 FPS",
    "eseg_lite_l": "80.1 mIoU at 79 FPS",
}


def segmentation_models() -> list[str]:
    """The segmentation entries of ``conf/model`` (LR-ASPP, ESeg-Lite S/M/L, ESeg S/M/L), then the RF2 variants."""

    def order(name: str) -> tuple[int, int, str]:
        family = 0 if name.startswith("lraspp") else 1 if name.startswith("eseg_lite") else 2
        return family, {"s": 0, "m": 1, "l": 2}.get(name.rsplit("_", 1)[-1], 0), name

    return sorted(densekit.list_models(arch="segmenter"), key=order) + list(VARIANTS)


def build_row_model(row: str, device: str | torch.device) -> nn.Module:
    """The model of a table row (a ``conf/model`` name or a :data:`VARIANTS` key), in eval mode."""
    name, overrides = VARIANTS.get(row, (row, {}))
    with torch.device(device):
        return densekit.create_model(name, **overrides).eval()


def cpu_latency_ms(model: nn.Module, size: tuple[int, int], warmup: int, iters: int) -> tuple[float, float]:
    """Median and fastest wall time of ``model(images)`` at batch 1 on the CPU, in milliseconds."""
    x = torch.rand(1, 3, *size)
    with torch.inference_mode():
        times = time_interleaved({"model": lambda: model(x)}, warmup, iters, synchronizer(torch.device("cpu")))
    ms = [t * 1e3 for t in times["model"]]
    return statistics.median(ms), min(ms)


def describe(cfg: Any) -> tuple[str, str]:
    """``(neck, head)`` columns of a resolved config."""
    n = cfg.neck
    neck = "-" if n is None else f"BiFPN P{n.min_level}-P{n.max_level}, {n.channels} x {n.repeats}"
    if cfg.head.type == "lraspp":
        return neck, f"LR-ASPP {cfg.head.channels or 128}"
    return neck, f"ESeg {cfg.head.channels or cfg.neck.channels} x {cfg.head.repeats}"


def segmentation_rows(names: list[str], size: tuple[int, int], warmup: int, iters: int) -> Iterator[str]:
    """The machine as a comment, then markdown table lines for ``names``."""
    yield (
        f"<!-- {cpu_name()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, warm-up {warmup}, {iters} timed runs -->"
    )
    yield (
        f"| model | backbone | neck | head | act | params | MACs {size[0]}x{size[1]} "
        "| CPU ms median | CPU ms best | paper |"
    )
    yield "|---|---|---|---|---|---:|---:|---:|---:|---|"
    for row in names:
        meta = build_row_model(row, "meta")
        cfg = meta.config
        latency = ["-", "-"]
        if iters > 0:
            latency = [f"{t:,.0f}" for t in cpu_latency_ms(build_row_model(row, "cpu"), size, warmup, iters)]
        cells = [
            row,
            cfg.backbone.name + (" (reduced tail)" if cfg.backbone.reduced_tail else ""),
            *describe(cfg),
            cfg.act if cfg.head.type == "eseg" else "relu / hardswish",
            f"{count_parameters(meta):,}",
            f"{count_macs(meta, size) / 1e9:.2f}B",
            *latency,
            SEGMENTATION_PAPER.get(row, "-"),
        ]
        yield "| " + " | ".join(cells) + " |"


def segmentation_table(names: list[str], t: DictConfig) -> Iterator[str]:
    """:func:`segmentation_rows` with ``t``'s options; exits with a message on a bad ``table.size``."""
    try:
        size = image_size_arg(t.size, [1024, 2048])
    except ValueError as err:
        raise UsageError(f"table.size: {err}") from err
    return segmentation_rows(names, size, t.warmup, t.iters)


# ---------------------------------------------------------------------------------------------- table=benchmarks


def benchmark_command(name: str, t: DictConfig) -> list[str]:
    """The ``benchmarks/benchmark.py`` command line of one row (without the JSON output path)."""
    cmd = [
        "python", "benchmarks/benchmark.py", f"model={name}", f"bench.iters={t.iters}", f"bench.warmup={t.warmup}",
        f"bench.device={t.device}", f"bench.precision={t.precision}", "bench.fold_bn=true",
        "bench.channels_last=true", "bench.matmul_peak=false",
    ]
    return cmd + [f"bench.compile={str(bool(t.compile)).lower()}"]


def benchmark_row(name: str, t: DictConfig) -> str:
    """One markdown row: the model's numbers from its benchmark run, or why the run failed."""
    cmd = benchmark_command(name, t)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        proc = subprocess.run([sys.executable, *cmd[1:], f"bench.output={out}"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            lines = proc.stderr.strip().splitlines() or ["no output"]
            reason = next((line.removeprefix("error: ") for line in lines if line.startswith("error: ")), lines[-1])
            return f"| {name} | - | - | - | - | - | - | failed: {reason} | `{shlex.join(cmd)}` |"
        r = json.loads(out.read_text())
    net, e2e = r["results"]["densekit"]["network"], r["results"]["densekit"]["end_to_end"]
    h, w = r["image_size"]
    return (
        f"| {name} | {h}x{w} | {r['params']:,} | {format_count(r['macs_per_image'])} | {net['median_ms']:,.1f} "
        f"| {e2e['median_ms']:,.1f} | {1000.0 / e2e['median_ms']:,.1f} | {'compiled' if r.get('densekit_compiled') else 'eager'} "
        f"| `{shlex.join(cmd)}` |"
    )


def benchmark_rows(names: list[str], t: DictConfig) -> Iterator[str]:
    """Markdown table lines for ``names``, each row as soon as its run has finished."""
    if str(t.precision) not in PRECISIONS:
        raise UsageError(f"table.precision={t.precision!r}: choose one of {', '.join(PRECISIONS)}")
    yield "| model | input | params | MACs | network ms | end-to-end ms | end-to-end FPS | mode | command |"
    yield "|---|---|---:|---:|---:|---:|---:|---|---|"
    for name in names:
        yield benchmark_row(name, t)


# ---------------------------------------------------------------------------------------------- entry point

#: table name -> (its rows when ``table.models`` is empty, its lines for the given rows and options)
TABLES: dict[str, tuple[Callable[[], list[str]], Callable[[list[str], DictConfig], Iterator[str]]]] = {
    "models": (lambda: densekit.list_models(arch="efficientdet"), lambda names, t: model_rows(names)),
    "segmentation": (segmentation_models, segmentation_table),
    "benchmarks": (densekit.list_models, benchmark_rows),
}


def table_lines(t: DictConfig) -> Iterator[str]:
    """The lines of the table ``t.name`` for the rows ``t.models`` (all of the table's when empty).

    Exits with a message on an unknown table or row, or a bad option, before any model is built or run.
    """
    if t.name not in TABLES:
        raise UsageError(f"table={t.name!r}: choose one of {', '.join(TABLES)}")
    all_rows, lines = TABLES[t.name]
    known = all_rows()
    unknown = [m for m in t.models if m not in known]
    if unknown:
        raise UsageError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(known)}")
    yield from lines(list(t.models) or known, t)


register_configs()


@hydra.main(config_path="../conf", config_name="table", version_base=None)
@reports_user_errors()
def hydra_main(cfg: DictConfig) -> None:
    """Entry point: print the chosen table, each line as soon as it is known (benchmark rows take minutes)."""
    for line in table_lines(cfg.table):
        print(line, flush=True)


def main() -> None:
    """A user's mistake is one ``error:`` block, exit code 2 (densekit.cli.errors)."""
    run_tool(hydra_main)


if __name__ == "__main__":
    main()
