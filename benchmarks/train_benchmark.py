"""Training throughput: one optimisation step of densekit vs effdet's ``DetBenchTrain``, and the data loader.

    python benchmarks/train_benchmark.py model=efficientdet_d0 bench.batch_size=4 bench.image_size=512
    python benchmarks/train_benchmark.py model=efficientdet_d7x bench.batch_size=1 bench.image_size=768 \
        bench.compare=false bench.grad_checkpoint=true bench.peak_memory=true bench.loader_images=0

A step is forward (with target assignment and loss), backward and an SGD update. With ``bench.compare=true`` effdet's
model gets densekit's weights and the same batch (boxes converted to its yxyx, 1-based format) and the steps are
timed in turn. Each of ``bench.layouts`` (``nchw``, ``channels_last``: weights and batch NHWC, as
``train.channels_last``) times both implementations; ``bench.grad_checkpoint=true`` adds densekit with
``model.grad_checkpoint``; ``bench.bf16=true`` adds densekit under bf16 autocast (``train.amp=bf16``, the ``+bf16`` rows);
``bench.compile=true`` adds densekit through ``torch.compile`` (``train.compile``) and, with ``bench.compare``,
effdet's whole bench compiled (the ``+compile`` rows, for each of ``bench.compile_layouts``; compiling happens in the
first warm-up step: minutes). ``bench.peak_memory=true`` runs one step of each row again in a fresh process and
reports how far the step raised its peak resident memory above the built models'. The loader is timed on the configured ``data`` (default: the synthetic set) with the train transform
at the same resolution, for each ``bench.num_workers``; if it delivers far more images/s than a step consumes, the
loader is not the bottleneck.
"""
from __future__ import annotations

import copy
import functools
import json
import multiprocessing
import resource
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

# A script's own folder heads sys.path: put the repository root first, so that `densekit` is this checkout's, not
# whichever copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from densekit.cli.errors import UsageError, reports_user_errors, run_tool  # noqa: E402
from densekit.config import register_configs  # noqa: E402
from densekit.benchmarks.references import NoReferenceError, effdet_targets, effdet_train_twin  # noqa: E402
from densekit.benchmarks.results import publish  # noqa: E402
from densekit.benchmarks.timing import device_description, stats, time_interleaved  # noqa: E402
from densekit.tasks.detection import build_coco_dataset  # noqa: E402
from densekit.data.coco import CocoDetection  # noqa: E402
from densekit.data.loader import build_loader  # noqa: E402
from densekit.data.transforms import build_train_transform  # noqa: E402
from densekit.modeling.build import build_model  # noqa: E402

NO_SYNC: Callable[[], None] = lambda: None  # noqa: E731  (training is timed on the CPU: nothing queued to wait for)


def random_targets(batch: int, size: int, per_image: int, num_classes: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``per_image`` random boxes (xyxy, inside a ``size`` square) and labels for each of ``batch`` images."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, per_image, 2, generator=g) * size * 0.7
    wh = (torch.rand(batch, per_image, 2, generator=g) * 0.25 + 0.03) * size
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], -1)
    labels = torch.randint(0, num_classes, (batch, per_image), generator=g)
    return [{"boxes": b, "labels": l} for b, l in zip(boxes, labels)]


def step_fn(loss_fn: Callable[[], torch.Tensor], params: Iterable[torch.nn.Parameter]) -> Callable[[], None]:
    """One optimisation step: ``loss_fn()``, backward, and an SGD (momentum) update of ``params``."""
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


def effdet_step(
    model: torch.nn.Module, images: torch.Tensor, targets: list[dict[str, torch.Tensor]],
    memory_format: torch.memory_format = torch.contiguous_format, compile: bool = False,
) -> tuple[Callable[[], None], str]:
    """effdet's ``DetBenchTrain`` step on the same batch, with ``model``'s weights (loaded into ``model``) stored in
    ``memory_format``, and the effdet model's name; exits with the reason when ``model`` has no effdet twin.
    ``compile``: the whole bench (network, anchor labelling, loss) through ``torch.compile``."""
    try:
        bench, name = effdet_train_twin(model, tuple(images.shape[-2:]))
    except NoReferenceError as err:
        raise UsageError(f"bench.compare=true: {err}") from err
    bench.model.to(memory_format=memory_format)
    normalised = (images - model.pixel_mean) / model.pixel_std
    target = effdet_targets(targets)
    forward = torch.compile(bench) if compile else bench
    return step_fn(lambda: forward(normalised, target)["loss"], bench.model.parameters()), name


def _endless(loader: Iterable[Any]) -> Iterator[Any]:
    """``loader``'s batches, starting it again at its end."""
    while True:
        yield from loader


def _images_per_s(loader: Iterable[Any], count: int) -> float:
    """Images per second ``loader`` delivers over at least ``count`` images, after its first batch."""
    batches = _endless(loader)
    next(batches)  # worker start-up is not throughput
    drawn: list[int] = []  # batch sizes, recorded by the timed call

    def draw() -> None:
        while sum(drawn) < count:
            images, _ = next(batches)
            drawn.append(images.shape[0])

    elapsed = time_interleaved({"loader": draw}, warmup=0, iters=1, sync=NO_SYNC)["loader"][0]
    return sum(drawn) / elapsed


def time_loader(cfg: DictConfig, size: int) -> dict[str, float]:
    """Images per second the train loader delivers at ``size``, for each ``bench.num_workers``."""
    data_cfg = OmegaConf.merge(cfg.data, {"image_size": size})
    dataset = build_coco_dataset(data_cfg, data_cfg.train_split, size, train=True)
    out = {}
    for workers in cfg.bench.num_workers:
        loader = build_loader(dataset, cfg.bench.batch_size, train=True, num_workers=workers)
        out[f"num_workers={workers}"] = _images_per_s(loader, cfg.bench.loader_images)
    return out


def write_coco_sized_jpegs(root: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    """``count`` 640x480 JPEGs (quality 90, smooth noise: photo-like entropy) and a COCO json with 4 boxes each."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        noise = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
        picture = cv2.GaussianBlur(cv2.resize(noise, (640, 480), interpolation=cv2.INTER_CUBIC), (0, 0), 3)
        cv2.imwrite(str(root / "images" / f"{i:06d}.jpg"), picture, [cv2.IMWRITE_JPEG_QUALITY, 90])
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "height": 480, "width": 640})
        for j in range(4):
            x, y = float(rng.uniform(0, 500)), float(rng.uniform(0, 360))
            annotations.append({"id": 4 * i + j + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, y, 120.0, 100.0],
                                "area": 12000.0, "iscrowd": 0})
    ann_file = root / "annotations.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))
    return root / "images", ann_file


def time_decoders(cfg: DictConfig, size: int) -> dict[str, float]:
    """Images per second one process (``num_workers=0``: what each worker delivers) gets through decoding and the full
    train transform at ``size``, on COCO-sized JPEGs, for each of ``bench.decoders``."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        image_dir, ann_file = write_coco_sized_jpegs(Path(tmp), int(cfg.bench.jpeg_images))
        transform = build_train_transform(size, scale_range=tuple(cfg.data.augment.scale_range), hflip=0.5)
        for decoder in cfg.bench.decoders:
            dataset = CocoDetection(image_dir, ann_file, transform=transform, train=True, decoder=decoder)
            loader = build_loader(dataset, cfg.bench.batch_size, train=True, num_workers=0)
            out[decoder] = _images_per_s(loader, cfg.bench.loader_images)
    return out


LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _loss(
    model: torch.nn.Module, images: torch.Tensor, targets: list[dict[str, torch.Tensor]], amp: torch.dtype | None = None
) -> torch.Tensor:
    """The summed losses as the trainer computes them; ``amp``: under autocast to that dtype (``train.amp``)."""
    with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
        return sum(model(images, targets).values())


def build_steps(cfg: DictConfig) -> tuple[dict[str, Callable[[], None]], str | None]:
    """One step function per row (``densekit``, ``effdet``, ``+cl`` for channels_last, ``densekit+ckpt``), each with
    its own copy of the same weights, and the effdet model's name (None without ``bench.compare``)."""
    size, batch = int(cfg.bench.image_size), int(cfg.bench.batch_size)
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    fns: dict[str, Callable[[], None]] = {}
    ref_name = None
    variants = [(layout, False) for layout in cfg.bench.layouts] + ([("nchw", True)] if cfg.bench.grad_checkpoint else [])
    for layout, checkpointing in variants:
        if layout not in LAYOUTS:
            raise UsageError(f"bench.layouts: {layout!r} is not one of {', '.join(LAYOUTS)}")
        torch.manual_seed(0)  # every row starts from the same weights
        model_cfg = OmegaConf.merge(cfg.model, {"image_size": [size, size], "grad_checkpoint": checkpointing})
        model = build_model(model_cfg).train().to(memory_format=LAYOUTS[layout])
        x = images.contiguous(memory_format=LAYOUTS[layout])
        targets = random_targets(batch, size, cfg.bench.boxes_per_image, model.num_classes)
        suffix = "+ckpt" if checkpointing else "+cl" if layout == "channels_last" else ""
        if cfg.bench.compare and not checkpointing:
            fns["effdet" + suffix], ref_name = effdet_step(model, x, targets, LAYOUTS[layout])
        fns["densekit" + suffix] = step_fn(functools.partial(_loss, model, x, targets), model.parameters())
        if cfg.bench.bf16 and not checkpointing:  # train.amp=bf16: the same model under bf16 autocast
            loss = functools.partial(_loss, model, x, targets, torch.bfloat16)
            fns[f"densekit{suffix}+bf16"] = step_fn(loss, model.parameters())
        if cfg.bench.compile and layout in cfg.bench.compile_layouts and not checkpointing:  # on a copy: copies run eagerly
            compiled = copy.deepcopy(model)
            compiled.compile_for_training()
            fns[f"densekit{suffix}+compile"] = step_fn(functools.partial(_loss, compiled, x, targets), compiled.parameters())
            if cfg.bench.compare:
                fns[f"effdet{suffix}+compile"], _ = effdet_step(model, x, targets, LAYOUTS[layout], compile=True)
    return fns, ref_name


def _status_kib(field: str) -> int | None:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status in KiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_step_mib(cfg_yaml: str, row: str) -> float:
    """In a fresh process: MiB by which one step of ``row`` raises the peak resident memory above the built models'.

    Linux: the peak (VmHWM) is reset to the current RSS just before the step (``/proc/self/clear_refs``). Not
    ``ru_maxrss``: a spawned process inherits its parent's peak, so a child of a big run reads 0. Elsewhere
    ``ru_maxrss`` is the fallback (correct when the parent is smaller than the step).
    """
    cfg = OmegaConf.create(cfg_yaml)
    fns, _ = build_steps(cfg)
    before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        before = None
    if before is None:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        fns[row]()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024
    fns[row]()
    return ((_status_kib("VmHWM") or before) - before) / 1024


def peak_memory(cfg: DictConfig, rows: Iterable[str]) -> dict[str, float]:
    """:func:`_peak_step_mib` of every row, each in its own spawned process (a process's peak never goes down)."""
    cfg_yaml = OmegaConf.to_yaml(cfg)
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return {row: pool.apply(_peak_step_mib, (cfg_yaml, row)) for row in rows}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Time the training steps and the loader as ``cfg.bench`` says; returns the results (the JSON written)."""
    if cfg.bench.threads:
        torch.set_num_threads(int(cfg.bench.threads))
    size, batch = int(cfg.bench.image_size), int(cfg.bench.batch_size)
    fns, ref_name = build_steps(cfg)
    times = time_interleaved(fns, cfg.bench.warmup, cfg.bench.iters, NO_SYNC)
    result = {
        "model": cfg.model.name, "effdet": ref_name, "device": device_description(torch.device("cpu")),
        "torch": torch.__version__, "batch_size": batch, "image_size": size,
        "train_step": {k: stats(v, batch) for k, v in times.items()},
        "loader_images_per_s": time_loader(cfg, size) if cfg.bench.loader_images else {},
        "decoder_images_per_s": time_decoders(cfg, size) if cfg.bench.loader_images and cfg.bench.decoders else {},
    }
    if cfg.bench.peak_memory:
        del fns  # the rows' models and activations are not this process's to keep while the children run
        result["peak_step_mib"] = peak_memory(cfg, result["train_step"])
    return result


def report(r: dict[str, Any]) -> str:
    """The printed form of :func:`run`'s results."""
    lines = [f"{r['model']} training step, batch {r['batch_size']} at {r['image_size']} px, {r['device']}, torch {r['torch']}"]
    for name, s in r["train_step"].items():
        lines.append(f"  {name:17s} step mean {s['mean_ms']:8.1f} ms  median {s['median_ms']:8.1f} ms  p90 {s['p90_ms']:8.1f} ms  "
                     f"{s['fps']:6.2f} images/s")
    steps = r["train_step"]
    for suffix, what in (("", "NCHW"), ("+cl", "channels_last")):
        if "effdet" + suffix in steps and "densekit" + suffix in steps:
            ratio = steps["densekit" + suffix]["median_ms"] / steps["effdet" + suffix]["median_ms"]
            lines.append(f"  densekit{suffix} / effdet{suffix} (median, both {what}): {ratio:.3f}")
    comparisons = [("densekit+cl", "effdet", "densekit's training default vs effdet as it ships")]
    comparisons += [(f"densekit{s}+compile", ref, what) for s in ("", "+cl") for ref, what in (
        ("effdet", "compiled densekit vs effdet as it ships"), (f"effdet{s}+compile", "both compiled"))]
    for row, ref, what in comparisons:
        if row in steps and ref in steps:
            ratio = steps[row]["median_ms"] / steps[ref]["median_ms"]
            lines.append(f"  {row} / {ref} (median; {what}): {ratio:.3f}")
    for row, mib in r.get("peak_step_mib", {}).items():
        lines.append(f"  {row:14s} step raises peak memory by {mib:8.0f} MiB")
    for k, v in r["loader_images_per_s"].items():
        lines.append(f"  loader ({k}, train transform): {v:8.1f} images/s")
    for k, v in r.get("decoder_images_per_s", {}).items():
        lines.append(f"  640x480 JPEGs, decoder {k:11s} + train transform, one process: {v:8.1f} images/s")
    return "\n".join(lines)


register_configs()


@hydra.main(config_path="../conf", config_name="train_benchmark", version_base=None)
@reports_user_errors()
def hydra_main(cfg: DictConfig) -> None:
    """Entry point: benchmark ``cfg.model``'s training step and the loader, print the results, write JSON if asked."""
    result = run(cfg)
    publish(result, report(result), cfg.bench.output)


def main() -> None:
    """A user's mistake is one ``error:`` block, exit code 2 (densekit.cli.errors)."""
    run_tool(hydra_main)


if __name__ == "__main__":
    main()
