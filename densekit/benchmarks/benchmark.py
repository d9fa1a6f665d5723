"""Latency of a densekit model, optionally side by side with the reference implementation of the same model.

Usage (``densekit benchmark`` takes the same overrides; ``python benchmarks/benchmark.py`` runs it in a checkout)::

    python benchmarks/benchmark.py model=efficientdet_d0 bench.iters=30          # the optimised model (default)
    python benchmarks/benchmark.py model=efficientdet_d0 bench.optimize=false    # the model as built
    python benchmarks/benchmark.py model=efficientdet_d0 bench.compare=true bench.compile=false bench.output=d0.json
    python benchmarks/benchmark.py model=efficientdet_d0 bench.device=cuda bench.precision=fp16 bench.batch_size=8
    python benchmarks/benchmark.py model=lraspp_mobilenet_v3_large image_size=[1024,2048] bench.compare=true
    python benchmarks/benchmark.py model=efficientdet_lite0 bench.backends=[torch,onnxruntime,openvino]

Two modes are timed under ``torch.inference_mode`` after ``bench.warmup`` untimed calls:

* network: ``model.forward_raw(images)`` (input normalisation + backbone, neck, head; a segmenter's logits are
  upsampled to the input size);
* end-to-end: ``model(images)`` in eval mode (normalisation, network, then box decoding, top-k and NMS, or the
  per-pixel argmax).

With ``bench.compare=true`` the reference implementation runs on the same input (pre-normalised outside the timed
region, because effdet and torchvision expect a normalised input) with densekit's weights copied from it, so that
both do the same work: effdet's ``EfficientDet`` / ``DetBenchPredict`` for EfficientDet models, torchvision's
``lraspp_mobilenet_v3_large`` (``["out"]`` / its argmax) for LR-ASPP. All timed functions are called in turn within
each iteration, so that a slow period of a shared machine hits every one of them alike.

densekit's model goes through :func:`densekit.optimize_for_inference` with ``bench.fold_bn`` (BN folding),
``bench.channels_last`` and ``bench.compile`` (torch.compile with inductor freezing, in ``bench.compile_mode``).
Left null, as by default, these and ``bench.cudnn_benchmark`` take the fastest configuration verified for the
device (:data:`OPTIMIZED`) under ``bench.optimize=true`` (the default: what a user asking for FPS wants), and are off
under ``bench.optimize=false`` (the model as built). ``bench.channels_last`` applies to the reference too. With
``bench.compile=true`` and ``bench.compare=true`` the reference is timed twice, eager and compiled the same way
(freezing), so one run gives both ratios. ``bench.precision=fp16|bf16`` runs every timed call, both sides, under
``torch.autocast``. Every timed call is device-synchronised (:func:`densekit.benchmarks.timing.synchronizer`: CUDA's
queue is drained before and after it). A compile that fails is reported and the eager numbers still come out.

``bench.backends=[torch,onnxruntime,openvino]`` (``tensorrt`` on CUDA) adds rows for the same model exported to each
deployment runtime, timed in the same interleaved call (:mod:`densekit.benchmarks.backends`); the default
``[torch]`` times the PyTorch rows alone.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import densekit
from densekit.benchmarks.backends import (
    backend_fns,
    backend_plan,
    backend_report,
    backend_summary,
    export_backends,
    primer_key,
    row_kinds,
    without_primers,
)
from densekit.benchmarks.references import NoReferenceError, ReferenceModel, reference_twin
from densekit.benchmarks.results import publish
from densekit.benchmarks.timing import (
    device_description,
    matmul_peak_gflops,
    stats,
    synchronizer,
    time_interleaved,
)
from densekit.cli.errors import UsageError, reports_user_errors, run_tool
from densekit.config import image_size_arg, register_configs
from densekit.deploy.optimize import compile_frozen
from densekit.engine.distributed import resolve_device as engine_resolve_device
from densekit.utils import count_macs, count_parameters, format_count

MODES = ("network", "end_to_end")
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": None}  # autocast dtype; None: none
# int8: densekit's network quantised (densekit.deploy.quantize, calibrated on the timed input), no autocast.


def resolve_device(name: str) -> torch.device:
    """``bench.device`` as a usable device, or exit with a message saying why it is not."""
    try:
        return engine_resolve_device(name)
    except ValueError as err:
        raise UsageError(f"bench.{err}") from err


#: What ``bench.optimize=true`` times where an option is left null: the fastest configuration verified on each
#: device. CPU (docs/benchmarks.md): BN folding + channels_last + torch.compile with inductor freezing, e.g. D0 31 vs
#: 40 ms optimised eager vs 86 ms as built. CUDA adds cuDNN's autotuner and CUDA graphs (compile mode
#: reduce-overhead: at batch 1 a D0 forward is hundreds of small kernels, bound by their launches); tools/
#: device_check.sh times it against the optimised eager model on the GPU. MPS: folding and channels_last only.
OPTIMIZED: dict[str, dict[str, Any]] = {
    "cpu": {"fold_bn": True, "channels_last": True, "compile": True},
    "cuda": {"fold_bn": True, "channels_last": True, "compile": True, "compile_mode": "reduce-overhead",
             "cudnn_benchmark": True},
    "mps": {"fold_bn": True, "channels_last": True},
}
#: The options ``bench.optimize`` decides when null, and their values for the model as built.
AS_BUILT: dict[str, Any] = {"fold_bn": False, "channels_last": False, "compile": False, "compile_mode": None,
                            "cudnn_benchmark": False}


def resolve_options(b: DictConfig, device: torch.device) -> DictConfig:
    """``cfg.bench`` with every null option of :data:`AS_BUILT` decided: the device's :data:`OPTIMIZED` value under
    ``bench.optimize=true``, the as-built one under ``bench.optimize=false``. An option given explicitly wins."""
    chosen = {**AS_BUILT, **(OPTIMIZED.get(device.type, {}) if b.optimize else {})}
    return OmegaConf.merge(b, {key: chosen[key] for key in AS_BUILT if b.get(key) is None})


def run_settings(b: DictConfig) -> tuple[torch.device, torch.dtype | None]:
    """The device and autocast dtype (None: no autocast) of ``cfg.bench``, or exit with why it is unusable; sets
    ``bench.threads``."""
    if b.iters < 1 or b.warmup < 0 or b.batch_size < 1:
        raise UsageError("bench.iters and bench.batch_size must be >= 1 and bench.warmup >= 0")
    device = resolve_device(str(b.device))
    if str(b.precision) not in PRECISIONS:
        raise UsageError(f"bench.precision={b.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if b.threads is not None:
        torch.set_num_threads(int(b.threads))
    return device, PRECISIONS[str(b.precision)]


def apply_device_settings(b: DictConfig, device: torch.device) -> None:
    """Process-wide switches of the resolved ``bench``: cuDNN's autotuner (each convolution's fastest algorithm for
    these shapes, chosen during the warm-up calls)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(b.cudnn_benchmark)


def describe_run(
    b: DictConfig, model: nn.Module, size: tuple[int, int], device: torch.device, amp_dtype: torch.dtype | None
) -> dict[str, Any]:
    """The results' header: what runs where, how, and the model's size; ``notes`` starts with the known pitfalls."""
    result: dict[str, Any] = {
        "model": model.config.name,
        "device": str(device),
        "device_name": device_description(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "batch_size": b.batch_size,
        "image_size": list(size),
        "optimize": bool(b.optimize),
        "channels_last": bool(b.channels_last),
        "fold_bn": bool(b.fold_bn),
        "compile": bool(b.compile),
        "compile_mode": b.compile_mode if b.compile else None,
        "cudnn_benchmark": bool(b.cudnn_benchmark) if device.type == "cuda" else None,
        "precision": str(b.precision),
        "warmup": b.warmup,
        "iters": b.iters,
        "params": count_parameters(model),
        "notes": [],
    }
    if device.type == "cpu" and amp_dtype == torch.float16:
        result["notes"].append(
            "fp16 on the CPU: measured far slower than fp32 on the development machine (EfficientDet-Lite0 network "
            "429 vs ~30 ms); fp16 is a GPU precision, bf16 the CPU's fast reduced one"
        )
    return result


def reference_fns(
    b: DictConfig, model: nn.Module, images: torch.Tensor, fmt: torch.memory_format, amp: Callable,
    result: dict[str, Any], macs: dict[str, int],
) -> dict[str, Callable[[], object]]:
    """The reference twin's timed functions (eager, and compiled with ``bench.compile``), keyed ``impl/mode``.

    Call before optimising ``model``: the twin's weights are loaded into the plain model. Records the reference in
    ``result`` and its MACs in ``macs``; exits with the reason when ``model`` has no twin.
    """
    size = tuple(images.shape[-2:])
    try:
        ref = reference_twin(model, size, b.batch_size)
    except NoReferenceError as err:
        raise UsageError(f"bench.compare=true: {err}") from err
    result["reference"] = {"implementation": ref.label, "model": ref.name}
    macs[ref.label] = count_macs(ref.network, size)
    device = images.device
    ref_images = ((images.cpu() - model.pixel_mean) / model.pixel_std).to(device).contiguous(memory_format=fmt)
    ref_net = ref.network.to(device, memory_format=fmt)
    ref_e2e = ref.end_to_end.to(device, memory_format=fmt)
    fns: dict[str, Callable[[], object]] = {
        f"{ref.label}/network": lambda: ref_net(ref_images),
        f"{ref.label}/end_to_end": lambda: ref_e2e(ref_images),
    }
    if b.compile:
        compiled = _compile_reference(ref, ref_net, ref_e2e, ref_images, amp, result["notes"], b.compile_mode)
        if compiled is not None:
            c_net, c_e2e = compiled
            macs[f"{ref.label}+compile"] = macs[ref.label]
            fns[f"{ref.label}+compile/network"] = lambda: c_net(ref_images)
            fns[f"{ref.label}+compile/end_to_end"] = lambda: c_e2e(ref_images)
    return fns


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the benchmark described by ``cfg`` and return the results (the JSON written to ``bench.output``)."""
    device, amp_dtype = run_settings(cfg.bench)
    plan, skipped = backend_plan(cfg.bench, device)
    b = resolve_options(cfg.bench, device)
    apply_device_settings(b, device)
    model = densekit.build_model(cfg.model).eval()
    try:
        size = image_size_arg(cfg.image_size, model.config.image_size)
    except ValueError as err:  # a command-line mistake: one line, no traceback
        raise UsageError(str(err)) from err
    result = describe_run(b, model, size, device, amp_dtype)
    result["notes"] += [f"{label} skipped: {why}" for label, why in skipped.items()]
    fmt = torch.channels_last if b.channels_last else torch.contiguous_format
    images = torch.rand(b.batch_size, 3, *size, generator=torch.Generator().manual_seed(0))
    images = images.to(device).contiguous(memory_format=fmt)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    macs: dict[str, int] = {"densekit": count_macs(model, size)}
    fns = reference_fns(b, model, images, fmt, amp, result, macs) if b.compare else {}
    # Exported from the plain fp32 model, before it is moved, folded or compiled: the artifacts start where a user's
    # export would (the exporter and the runtimes fold BatchNorm themselves).
    backends = export_backends(plan, model, images, result["notes"])
    model = model.to(device, memory_format=fmt)
    # Under autocast as the timed calls run: compiling the example input outside it would compile a second graph
    # (autocast is part of what dynamo guards on) at the first timed call.
    with warnings.catch_warnings(record=True) as caught, amp():
        warnings.simplefilter("always", RuntimeWarning)
        model = densekit.optimize_for_inference(
            model, channels_last=bool(b.channels_last), fold_bn=bool(b.fold_bn), compile=bool(b.compile),
            example_input=images if b.compile else None, compile_mode=b.compile_mode,
            **({"precision": "int8", "calibration": images} if b.precision == "int8" else {}),
        )
    result["notes"] += [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    result["densekit_compiled"] = bool(b.compile) and all(t in vars(model) for t in model.compile_targets())
    fns["densekit/network"] = lambda: model.forward_raw(images)
    fns["densekit/end_to_end"] = lambda: model(images)
    fns = timing_order(fns, backend_fns(backends, device.type if amp_dtype is not None else None))
    with torch.inference_mode(), amp():
        times = without_primers(time_interleaved(fns, b.warmup, b.iters, synchronizer(device)))
    result["macs_per_image"] = macs["densekit"]
    if b.matmul_peak:
        result["matmul_peak_gflops"] = matmul_peak_gflops(device, amp_dtype or torch.float32)
    kinds = row_kinds(backends)  # the backends run densekit's model: its MACs
    summary = summarise(times, {**macs, **dict.fromkeys(kinds, macs["densekit"])}, b.batch_size, b.precision, kinds)
    if plan or skipped:
        summary["backends"] = backend_summary(backends, skipped, summary["results"])
    return {**result, **summary}


def timing_order(
    fns: dict[str, Callable[[], object]], backend_rows: dict[str, Callable[[], object]]
) -> dict[str, Callable[[], object]]:
    """The order of the calls within each iteration (also the report's): densekit first, then the references,
    network before end-to-end, then the deployment backends' rows in ``backend_rows``' order. With backends, a
    primer call of densekit's network heads the torch rows, as one heads each backend's
    (densekit.benchmarks.backends)."""
    order = ["densekit"] + sorted({k.split("/")[0] for k in fns} - {"densekit"})
    fns = {k: fns[k] for k in sorted(fns, key=lambda k: (order.index(k.split("/")[0]), MODES.index(k.split("/")[1])))}
    primer = {primer_key("densekit"): fns["densekit/network"]} if backend_rows else {}
    return {**primer, **fns, **backend_rows}


def summarise(
    times: dict[str, list[float]], macs: dict[str, int], batch: int, precision: str = "fp32",
    backends: dict[str, tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """``results`` (statistics, achieved GFLOP/s and raw times per ``impl/mode``, each row naming its backend and
    precision) and ``ratios`` (densekit over each reference, by mode) of the timed functions' wall times.

    ``backends``: row -> (backend, precision) of the deployment backends' rows; every other row is ``torch`` at
    ``precision``. Backend rows get no ``ratios`` entry: :func:`densekit.benchmarks.backends.backend_ratios` puts them
    against torch.
    """
    backends = backends or {}
    results: dict[str, dict[str, Any]] = {}
    for key, t in times.items():
        impl, mode = key.split("/")
        entry = stats(t, batch)
        if mode == "network":  # achieved throughput: 2 FLOPs per multiply-add, over the median time
            entry["gflops"] = 2 * macs[impl] * batch / (entry["median_ms"] * 1e6)
        backend, row_precision = backends.get(impl, ("torch", precision))
        # Raw times too: on a shared machine the spread says whether the summary statistics can be trusted.
        results.setdefault(impl, {})[mode] = {**entry, "backend": backend, "precision": row_precision,
                                              "times_ms": [x * 1000.0 for x in t]}
    ours = results["densekit"]
    ratios = {  # densekit over each reference row, by mode
        impl: {mode: {k: ours[mode][k] / res[mode][k] for k in ("mean_ms", "median_ms")} for mode in MODES}
        for impl, res in results.items() if impl != "densekit" and impl not in backends
    }
    return {"results": results, "ratios": ratios}


def _compile_reference(
    ref: ReferenceModel, network: nn.Module, end_to_end: nn.Module, images: torch.Tensor, amp: Callable,
    notes: list[str], mode: str | None = None,
) -> tuple[nn.Module, nn.Module] | None:
    """The reference compiled with inductor freezing (compiled now), or None with a note on failure.

    As on densekit's side, a network followed by eager post-processing (effdet's ``DetBenchPredict``) compiles the
    network once and runs both timed paths through it; an end-to-end module that is one tensor program
    (torchvision's logits + argmax) is compiled whole, like densekit's segmenter ``predict_labels``.
    """
    try:
        compiled_net = compile_frozen(network, mode=mode)
        if ref.end_to_end_on is not None:
            compiled = compiled_net, ref.end_to_end_on(compiled_net).to(images.device)
        else:
            compiled = compiled_net, compile_frozen(end_to_end, mode=mode)
        with torch.inference_mode(), amp():
            for fn in compiled:
                fn(images)
    except Exception as err:  # noqa: BLE001 - dynamo / inductor raise many types; all mean "not compiled"
        notes.append(f"{ref.label} could not be compiled ({type(err).__name__}: {err}); timed eager only")
        return None
    return compiled


def report(r: dict[str, Any]) -> str:
    """The printed form of :func:`run`'s results."""
    h, w = r["image_size"]
    ref = r.get("reference")
    steps = [name for name, on in (("BN folded", r["fold_bn"]), ("channels_last", r["channels_last"])) if on]
    if r["compile"]:
        mode = f", mode {r['compile_mode']}" if r.get("compile_mode") else ""
        steps.append(f"torch.compile (inductor freezing{mode})" if r["densekit_compiled"] else "compile FAILED: eager")
    if r.get("cudnn_benchmark"):
        steps.append("cudnn.benchmark")
    versions = f"torch {r['torch']}" + (f", CUDA {r['cuda']}" if r.get("cuda") else "")
    lines = [
        f"device    {r['device']} ({r['device_name']}), {versions}",
        f"model     {r['model']}" + (f"  vs {ref['implementation']} {ref['model']}" if ref else ""),
        f"input     {r['batch_size']}x3x{h}x{w} {r['precision']}, "
        + ("channels_last" if r["channels_last"] else "contiguous (NCHW)"),
        f"densekit  {', '.join(steps) if steps else 'as built (eager)'}"
        + ("" if r.get("optimize", True) else "  (bench.optimize=false)"),
        f"params    {r['params']:,}   MACs/image {format_count(r['macs_per_image'])}",
        f"timing    {r['warmup']} warm-up + {r['iters']} timed calls each, interleaved",
    ]
    if "matmul_peak_gflops" in r:
        lines.append(f"matmul    measured peak {r['matmul_peak_gflops']:,.1f} GFLOP/s ({r['precision']})")
    lines += ["", f"{'':<20}{'mode':<12}{'mean ms':>9}{'median ms':>11}{'p90 ms':>9}{'FPS':>8}{'GFLOP/s':>9}"]
    for impl, modes in r["results"].items():
        for mode, s in modes.items():
            gflops = f"{s['gflops']:>9.0f}" if "gflops" in s else ""
            lines.append(
                f"{impl:<20}{mode:<12}{s['mean_ms']:>9.2f}{s['median_ms']:>11.2f}{s['p90_ms']:>9.2f}{s['fps']:>8.1f}{gflops}"
            )
    if "matmul_peak_gflops" in r:
        net = r["results"]["densekit"]["network"]
        lines.append(f"densekit network: {100 * net['gflops'] / r['matmul_peak_gflops']:.0f}% of the matmul peak")
    e2e, net = r["results"]["densekit"]["end_to_end"]["median_ms"], r["results"]["densekit"]["network"]["median_ms"]
    lines.append(f"densekit end-to-end overhead (pre + post-processing): {e2e - net:.2f} ms, {100 * (e2e - net) / net:.0f}% of the network")
    for impl, ratios in r["ratios"].items():
        lines.append("")
        for mode, ratio in ratios.items():
            lines.append(f"densekit / {impl}, {mode:<11} mean {ratio['mean_ms']:.3f}x   median {ratio['median_ms']:.3f}x")
    lines += backend_report(r)
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


register_configs()


@hydra.main(config_path="../conf", config_name="benchmark", version_base=None)
@reports_user_errors()
def hydra_main(cfg: DictConfig) -> None:
    """Entry point: benchmark ``cfg.model`` as ``cfg.bench`` says, print the results, write JSON if asked."""
    result = run(cfg)
    publish(result, report(result), cfg.bench.output)


def main() -> None:
    """A user's mistake is one ``error:`` block, exit code 2 (densekit.cli.errors)."""
    run_tool(hydra_main)


if __name__ == "__main__":
    main()
