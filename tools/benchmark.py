"""Latency of a densekit model, optionally side by side with efficientdet-pytorch's same model.

Usage::

    python tools/benchmark.py model=efficientdet_d0 bench.iters=30
    python tools/benchmark.py model=efficientdet_d0 bench.compare=true bench.channels_last=true bench.output=d0.json
    python tools/benchmark.py model=efficientdet_d0 bench.compare=true bench.channels_last=true bench.optimize=true

Two modes are timed under ``torch.inference_mode`` after ``bench.warmup`` untimed calls:

* network: ``model.forward_raw(images)`` (input normalisation + backbone, BiFPN, head);
* end-to-end: ``model(images)`` in eval mode (normalisation, network, box decoding, top-k, NMS).

With ``bench.compare=true``, effdet's ``EfficientDet`` (network) and ``DetBenchPredict`` (end-to-end) run on the
same input, pre-normalised outside the timed region because effdet expects a normalised input, with densekit's
weights copied from effdet so that both do the same NMS work. All timed functions are called in turn within each
iteration, so that a slow period of a shared machine hits every one of them alike.

``bench.optimize=true`` times densekit's model after :func:`densekit.optimize_for_inference` (BN folded, channels_last
as ``bench.channels_last``); effdet's side is unchanged. ``bench.precision=bf16`` runs every timed call, both sides,
under ``torch.autocast`` with bfloat16.
"""
from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, ListConfig
from torch import nn

import densekit
from densekit.utils import count_macs, count_parameters, effdet_counterpart, format_count
from densekit.utils.benchmarking import device_description, stats, synchronizer, time_interleaved

MODES = ("network", "end_to_end")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # the autocast dtype; None = no autocast


def resolve_device(name: str) -> torch.device:
    """``bench.device`` as a usable device, or exit with a message saying why it is not."""
    try:
        device = torch.device(name)
    except RuntimeError:
        sys.exit(f"bench.device={name!r} is not a device; use cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"bench.device={name!r}: CUDA is not available in this PyTorch build or on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            sys.exit(f"bench.device={name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            sys.exit(f"bench.device={name!r}: MPS is not available on this machine")
    elif device.type != "cpu":
        sys.exit(f"bench.device={name!r}: benchmarking supports cpu, cuda and mps")
    return device


def effdet_twin(model: nn.Module, size: tuple[int, int]) -> tuple[nn.Module, nn.Module, str]:
    """effdet's model for ``model`` with the same weights: (EfficientDet, DetBenchPredict, effdet name).

    Exits with a message when the model has no effdet counterpart or the two architectures do not match (e.g.
    after a config override that effdet's model does not have).
    """
    name = model.config.name
    effdet_name = effdet_counterpart(name)
    if effdet_name is None:
        sys.exit(f"bench.compare=true: {name!r} has no efficientdet-pytorch counterpart (known: efficientdet_d0-d7x, "
                 "efficientdet_lite0-4); run without bench.compare")
    try:
        from effdet import DetBenchPredict, EfficientDet, get_efficientdet_config
    except ImportError:
        sys.exit("bench.compare=true needs efficientdet-pytorch: pip install effdet")
    from densekit.modeling.checkpoint_io import CheckpointError, load_state_dict_checked
    from densekit.modeling.weights import convert_effdet

    cfg = get_efficientdet_config(effdet_name)
    cfg.num_classes = model.config.num_classes
    cfg.image_size = list(size)  # DetBenchPredict makes its anchors for this size
    ref = EfficientDet(cfg, pretrained_backbone=False)
    ours_n, ref_n = count_parameters(model), count_parameters(ref)
    if ours_n != ref_n:  # the short answer for the common case, an architecture override effdet's model lacks
        sys.exit(f"bench.compare=true: densekit's {name} as configured has {ours_n:,} parameters, effdet's "
                 f"{effdet_name} {ref_n:,}: not the same model (drop the architecture overrides to compare)")
    try:
        load_state_dict_checked(model, convert_effdet(ref.state_dict(), len(model.backbone.feature_specs)), effdet_name)
    except CheckpointError as err:
        sys.exit(f"bench.compare=true: densekit's {name} (with the given overrides) is not effdet's {effdet_name}:\n{err}")
    return ref, DetBenchPredict(ref), effdet_name


def input_size(value: object, default: list[int]) -> tuple[int, int]:
    """``image_size`` as ``(H, W)``: None -> ``default``, an int -> square, a pair -> itself."""
    value = default if value is None else value
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple, ListConfig)) and len(value) == 2:
        return int(value[0]), int(value[1])
    sys.exit(f"image_size must be an int or [H, W], got {value!r}")


def run(cfg: DictConfig) -> dict:
    """Run the benchmark described by ``cfg`` and return the results (the JSON written to ``bench.output``)."""
    b = cfg.bench
    if b.iters < 1 or b.warmup < 0 or b.batch_size < 1:
        sys.exit("bench.iters and bench.batch_size must be >= 1 and bench.warmup >= 0")
    device = resolve_device(str(b.device))
    if str(b.precision) not in PRECISIONS:
        sys.exit(f"bench.precision={b.precision!r}: choose one of {', '.join(PRECISIONS)}")
    amp_dtype = PRECISIONS[str(b.precision)]
    if b.threads is not None:
        torch.set_num_threads(int(b.threads))
    model = densekit.build_model(cfg.model).eval()
    size = input_size(cfg.image_size, list(model.config.image_size))
    result: dict = {
        "model": model.config.name,
        "device": str(device),
        "device_name": device_description(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": b.batch_size,
        "image_size": list(size),
        "channels_last": bool(b.channels_last),
        "optimize": bool(b.optimize),
        "precision": str(b.precision),
        "warmup": b.warmup,
        "iters": b.iters,
        "params": count_parameters(model),
    }
    fmt = torch.channels_last if b.channels_last else torch.contiguous_format
    images = torch.rand(b.batch_size, 3, *size, generator=torch.Generator().manual_seed(0))
    images = images.to(device).contiguous(memory_format=fmt)
    fns: dict[str, Callable[[], object]] = {}
    if b.compare:
        ref, ref_bench, result["effdet_model"] = effdet_twin(model, size)
        mean, std = model.pixel_mean.cpu(), model.pixel_std.cpu()
        ref_images = ((images.cpu() - mean) / std).to(device).contiguous(memory_format=fmt)
        img_info = {  # so that effdet clips boxes to the image as densekit does
            "img_scale": torch.ones(b.batch_size, device=device),
            "img_size": torch.tensor([[size[1], size[0]]] * b.batch_size, device=device),
        }
        ref_bench = ref_bench.to(device, memory_format=fmt).eval()
        fns["effdet/network"] = lambda: ref(ref_images)
        fns["effdet/end_to_end"] = lambda: ref_bench(ref_images, img_info)
    model = model.to(device, memory_format=fmt)
    if b.optimize:  # after effdet_twin, which loads effdet's weights into the unoptimised model
        model = densekit.optimize_for_inference(model, channels_last=bool(b.channels_last))
    fns["densekit/network"] = lambda: model.forward_raw(images)
    fns["densekit/end_to_end"] = lambda: model(images)
    # A fixed order within each iteration: densekit first, network before end-to-end (also the report's order).
    fns = {key: fns[key] for key in sorted(fns, key=lambda k: (k.split("/")[0], MODES.index(k.split("/")[1])))}
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        times = time_interleaved(fns, b.warmup, b.iters, synchronizer(device))
    # Counted after timing: the meta-device copy then inherits the model's already-logged padding notice (once).
    result["macs_per_image"] = count_macs(model, size)
    if b.compare:
        result["effdet_macs_per_image"] = count_macs(ref, size)
    result["results"] = {}
    for key, t in times.items():
        impl, mode = key.split("/")
        # Raw times too: on a shared machine the spread says whether the summary statistics can be trusted.
        result["results"].setdefault(impl, {})[mode] = {**stats(t, b.batch_size), "times_ms": [x * 1000.0 for x in t]}
    if b.compare:
        ours, theirs = result["results"]["densekit"], result["results"]["effdet"]
        result["ratio_densekit_over_effdet"] = {
            mode: {k: ours[mode][k] / theirs[mode][k] for k in ("mean_ms", "median_ms")} for mode in MODES
        }
    return result


def report(r: dict) -> str:
    """The printed form of :func:`run`'s results."""
    h, w = r["image_size"]
    lines = [
        f"device    {r['device']} ({r['device_name']})",
        f"torch     {r['torch']}",
        f"model     {r['model']}" + (f"  vs effdet {r['effdet_model']}" if "effdet_model" in r else ""),
        f"input     {r['batch_size']}x3x{h}x{w} {r['precision']}, "
        + ("channels_last" if r["channels_last"] else "contiguous (NCHW)"),
        f"densekit  {'optimize_for_inference (BN folded)' if r['optimize'] else 'as built'}",
        f"params    {r['params']:,}   MACs/image {format_count(r['macs_per_image'])}"
        + (f" (effdet {format_count(r['effdet_macs_per_image'])})" if "effdet_macs_per_image" in r else ""),
        f"timing    {r['warmup']} warm-up + {r['iters']} timed calls each, interleaved",
        "",
        f"{'':<10}{'mode':<12}{'mean ms':>9}{'median ms':>11}{'p90 ms':>9}{'FPS':>8}",
    ]
    for impl, modes in r["results"].items():
        for mode, s in modes.items():
            lines.append(
                f"{impl:<10}{mode:<12}{s['mean_ms']:>9.2f}{s['median_ms']:>11.2f}{s['p90_ms']:>9.2f}{s['fps']:>8.1f}"
            )
    if "ratio_densekit_over_effdet" in r:
        lines.append("")
        for mode, ratio in r["ratio_densekit_over_effdet"].items():
            lines.append(f"densekit / effdet, {mode:<11} mean {ratio['mean_ms']:.3f}x   median {ratio['median_ms']:.3f}x")
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="benchmark", version_base=None)
def main(cfg: DictConfig) -> None:
    """Entry point: benchmark ``cfg.model`` as ``cfg.bench`` says, print the results, write JSON if asked."""
    result = run(cfg)
    print(report(result))
    if cfg.bench.output:
        path = Path(to_absolute_path(str(cfg.bench.output)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
