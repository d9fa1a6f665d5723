"""fp32 eager vs fp32 compiled vs bf16 compiled vs int8 compiled, end to end, interleaved in one run (docs/benchmarks.md
"INT8 / BF16 on CPU"): ``python benchmarks/precisions.py efficientdet_lite0 320 [iters]``.

Random weights and random calibration images: this times the kernels, it does not score accuracy
(tools/quantize.py does both on a trained checkpoint). The ratios are what to compare, not absolute times.
A size is ``320`` (square) or ``1024x2048`` (height x width).
"""
from __future__ import annotations

import sys
from pathlib import Path

# A script's own folder heads sys.path: put the repository root first, so that `densekit` is this checkout's, not
# whichever copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import densekit  # noqa: E402
from densekit.benchmarks.timing import cpu_name, stats, synchronizer, time_interleaved  # noqa: E402
from densekit.deploy.quantize import bf16_supported  # noqa: E402


def main(name: str, size: tuple[int, int], iters: int = 10, warmup: int = 2) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    model = densekit.create_model(name).eval()
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    calibration = torch.rand(8, 3, *size, generator=torch.Generator().manual_seed(1))
    models = {"fp32 eager": densekit.optimize_for_inference(model),  # BN folded, channels_last, not compiled
              "fp32": densekit.optimize_for_inference(model, compile=True, example_input=images, strict=True)}
    if bf16_supported():
        models["bf16"] = densekit.optimize_for_inference(model, compile=True, precision="bf16")
    models["int8"] = densekit.optimize_for_inference(model, compile=True, precision="int8", calibration=calibration)
    with torch.inference_mode():
        times = time_interleaved({k: (lambda m=m: m(images)) for k, m in models.items()}, warmup, iters,
                                 synchronizer(torch.device("cpu")))
    result = {k: stats(t, 1) for k, t in times.items()}
    print(f"{name} {size[0]}x{size[1]} batch 1 end to end, {cpu_name()}, {torch.get_num_threads()} threads, {iters} iters")
    for k, r in result.items():
        print(f"  {k:<10} median {r['median_ms']:8.2f} ms  p90 {r['p90_ms']:8.2f} ms  "
              f"{r['median_ms'] / result['fp32']['median_ms']:.2f}x fp32")
    return result


if __name__ == "__main__":
    h, _, w = sys.argv[2].partition("x")  # 320 (square) or 1024x2048 (height x width)
    main(sys.argv[1], (int(h), int(w or h)), *(int(a) for a in sys.argv[3:4]))
