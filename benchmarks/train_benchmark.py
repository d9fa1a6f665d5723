"""Training throughput: one optimisation step of densekit vs effdet's ``DetBenchTrain``, and the data loader.

    python benchmarks/train_benchmark.py model=efficientdet_d0 bench.batch_size=4 bench.image_size=512

A step is forward (with target assignment and loss), backward and an SGD update. With ``bench.compare=true`` effdet's
model gets densekit's weights and the same batch (boxes converted to its yxyx, 1-based format) and the two steps are
timed in turn. The loader is timed on the configured ``data`` (default: the synthetic set) with the train transform
at the same resolution, for each ``bench.num_workers``; if it delivers far more images/s than a step consumes, the
loader is not the bottleneck.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

# A script's own folder heads sys.path: put the repository root first, so that `benchmarks` imports and `densekit`
# is this checkout's, not whichever copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from densekit.config import register_configs  # noqa: E402
from benchmarks.references import NoReferenceError, effdet_targets, effdet_train_twin  # noqa: E402
from benchmarks.results import publish  # noqa: E402
from benchmarks.timing import device_description, stats, time_interleaved  # noqa: E402
from densekit.tasks.detection import build_coco_dataset  # noqa: E402
from densekit.data.loader import build_loader  # noqa: E402
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
    model: torch.nn.Module, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]
) -> tuple[Callable[[], None], str]:
    """effdet's ``DetBenchTrain`` step on the same batch, with ``model``'s weights (loaded into ``model``), and the
    effdet model's name; exits with the reason when ``model`` has no effdet twin."""
    try:
        bench, name = effdet_train_twin(model, tuple(images.shape[-2:]))
    except NoReferenceError as err:
        sys.exit(f"bench.compare=true: {err}")
    normalised = (images - model.pixel_mean) / model.pixel_std
    target = effdet_targets(targets)
    return step_fn(lambda: bench(normalised, target)["loss"], bench.model.parameters()), name


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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Time the training steps and the loader as ``cfg.bench`` says; returns the results (the JSON written)."""
    if cfg.bench.threads:
        torch.set_num_threads(int(cfg.bench.threads))
    size, batch = int(cfg.bench.image_size), int(cfg.bench.batch_size)
    model = build_model(OmegaConf.merge(cfg.model, {"image_size": [size, size]})).train()
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    targets = random_targets(batch, size, cfg.bench.boxes_per_image, model.num_classes)
    fns: dict[str, Callable[[], None]] = {}
    ref_name = None
    if cfg.bench.compare:
        fns["effdet"], ref_name = effdet_step(model, images, targets)
    fns["densekit"] = step_fn(lambda: sum(model(images, targets).values()), model.parameters())
    times = time_interleaved(fns, cfg.bench.warmup, cfg.bench.iters, NO_SYNC)
    result = {
        "model": cfg.model.name, "effdet": ref_name, "device": device_description(torch.device("cpu")),
        "torch": torch.__version__, "batch_size": batch, "image_size": size,
        "train_step": {k: stats(v, batch) for k, v in times.items()},
        "loader_images_per_s": time_loader(cfg, size),
    }
    return result


def report(r: dict[str, Any]) -> str:
    """The printed form of :func:`run`'s results."""
    lines = [f"{r['model']} training step, batch {r['batch_size']} at {r['image_size']} px, {r['device']}, torch {r['torch']}"]
    for name, s in r["train_step"].items():
        lines.append(f"  {name:9s} step mean {s['mean_ms']:8.1f} ms  median {s['median_ms']:8.1f} ms  p90 {s['p90_ms']:8.1f} ms  "
                     f"{s['fps']:6.2f} images/s")
    if "effdet" in r["train_step"]:
        ratio = r["train_step"]["densekit"]["median_ms"] / r["train_step"]["effdet"]["median_ms"]
        lines.append(f"  densekit / effdet (median): {ratio:.3f}")
    for k, v in r["loader_images_per_s"].items():
        lines.append(f"  loader ({k}, train transform): {v:8.1f} images/s")
    return "\n".join(lines)


register_configs()


@hydra.main(config_path="../conf", config_name="train_benchmark", version_base=None)
def main(cfg: DictConfig) -> None:
    """Entry point: benchmark ``cfg.model``'s training step and the loader, print the results, write JSON if asked."""
    result = run(cfg)
    publish(result, report(result), cfg.bench.output)


if __name__ == "__main__":
    main()
