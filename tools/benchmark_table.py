"""Every model's row for docs/benchmarks.md: params, MACs and latency at its native size, each with its command.

Usage::

    HF_HUB_OFFLINE=1 python tools/benchmark_table.py                              # all models, CPU
    HF_HUB_OFFLINE=1 python tools/benchmark_table.py efficientdet_d0 eseg_lite_s --iters 5
    HF_HUB_OFFLINE=1 python tools/benchmark_table.py --device cuda --precision fp16 --compile   # GPU FPS

Each row is one run of ``benchmarks/benchmark.py`` in its own process (so one model's memory or compiled kernels never
affect the next), with BN folding and channels_last (densekit's optimised eager model; ``--compile`` adds
torch.compile with inductor freezing) at the model's native size: EfficientDet's ``image_size``, 1024x2048 for the
Cityscapes segmenters. The ``command`` column is that exact command; run it to reproduce or extend a row.
A model whose run fails gets a row that says so, and the table goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

import densekit  # noqa: E402
from densekit.utils import format_count  # noqa: E402


def command(name: str, args: argparse.Namespace) -> list[str]:
    """The ``benchmarks/benchmark.py`` command line of one row (without the JSON output path)."""
    cmd = [
        "python", "benchmarks/benchmark.py", f"model={name}", f"bench.iters={args.iters}", f"bench.warmup={args.warmup}",
        f"bench.device={args.device}", f"bench.precision={args.precision}", "bench.fold_bn=true",
        "bench.channels_last=true", "bench.matmul_peak=false",
    ]
    return cmd + (["bench.compile=true"] if args.compile else [])


def run_row(name: str, args: argparse.Namespace) -> str:
    """One markdown row: the model's numbers from its benchmark run, or why the run failed."""
    cmd = command(name, args)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        proc = subprocess.run([sys.executable, *cmd[1:], f"bench.output={out}"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return f"| {name} | - | - | - | - | - | - | failed: {reason} | `{shlex.join(cmd)}` |"
        r = json.loads(out.read_text())
    net, e2e = r["results"]["densekit"]["network"], r["results"]["densekit"]["end_to_end"]
    h, w = r["image_size"]
    return (
        f"| {name} | {h}x{w} | {r['params']:,} | {format_count(r['macs_per_image'])} | {net['median_ms']:,.1f} "
        f"| {e2e['median_ms']:,.1f} | {1000.0 / e2e['median_ms']:,.1f} | {'compiled' if r.get('densekit_compiled') else 'eager'} "
        f"| `{shlex.join(cmd)}` |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="conf/model names (default: all)")
    parser.add_argument("--iters", type=int, default=3, help="timed calls per mode (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--compile", action="store_true", help="also torch.compile (inductor freezing)")
    args = parser.parse_args()
    known = densekit.list_models()
    unknown = [m for m in args.models if m not in known]
    if unknown:
        sys.exit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(known)}")
    print("| model | input | params | MACs | network ms | end-to-end ms | end-to-end FPS | mode | command |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    for name in args.models or known:
        print(run_row(name, args), flush=True)


if __name__ == "__main__":
    main()
