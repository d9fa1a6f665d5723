"""Training throughput: one optimisation step of densekit vs effdet's ``DetBenchTrain``, and the data loader.

    python tools/train_benchmark.py model=efficientdet_d0 bench.batch_size=4 bench.image_size=512

A step is forward (with target assignment and loss), backward and an SGD update. With ``bench.compare=true`` effdet's
model gets densekit's weights and the same batch (boxes converted to its yxyx, 1-based format) and the two steps are
timed in turn. The loader is timed on the configured ``data`` (default: the synthetic set) with the train transform
at the same resolution, for each ``bench.num_workers``; if it delivers far more images/s than a step consumes, the
loader is not the bottleneck.
"""
from __future__ import annotations

import sys
import time

import hydra
import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

import densekit
from densekit.config import register_configs
from densekit.tasks.detection import build_coco_dataset
from densekit.data.loader import build_loader
from densekit.modeling.build import build_model
from densekit.utils import effdet_counterpart
from densekit.utils.benchmarking import device_description, save_result, stats, time_interleaved


def random_targets(batch: int, size: int, per_image: int, num_classes: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, per_image, 2, generator=g) * size * 0.7
    wh = (torch.rand(batch, per_image, 2, generator=g) * 0.25 + 0.03) * size
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], -1)
    labels = torch.randint(0, num_classes, (batch, per_image), generator=g)
    return [{"boxes": b, "labels": l} for b, l in zip(boxes, labels)]


def step_fn(loss_fn, params) -> callable:
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


def effdet_step(model: torch.nn.Module, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]):
    name = effdet_counterpart(model.config.name)
    if name is None:
        sys.exit(f"bench.compare=true: {model.config.name!r} has no efficientdet-pytorch counterpart")
    from effdet import DetBenchTrain, EfficientDet, get_efficientdet_config

    from densekit.checkpoint.convert import convert_effdet
    from densekit.checkpoint.io import load_state_dict_checked

    cfg = get_efficientdet_config(name)
    cfg.num_classes = model.config.num_classes
    cfg.image_size = list(images.shape[-2:])
    ref = EfficientDet(cfg, pretrained_backbone=False)
    load_state_dict_checked(model, convert_effdet(ref.state_dict(), len(model.backbone.feature_specs)), name)
    bench = DetBenchTrain(ref).train()
    normalised = (images - model.pixel_mean) / model.pixel_std
    target = {
        "bbox": torch.stack([t["boxes"][:, [1, 0, 3, 2]] for t in targets]),  # effdet wants yxyx
        "cls": torch.stack([t["labels"] + 1 for t in targets]).float(),  # and 1-based classes
    }
    return step_fn(lambda: bench(normalised, target)["loss"], ref.parameters()), name


def time_loader(cfg: DictConfig, size: int) -> dict[str, float]:
    data_cfg = OmegaConf.merge(cfg.data, {"image_size": size})
    dataset = build_coco_dataset(data_cfg, data_cfg.train_split, size, train=True)
    out = {}
    for workers in cfg.bench.num_workers:
        loader = build_loader(dataset, cfg.bench.batch_size, train=True, num_workers=workers)
        it, seen = iter(loader), 0
        next(it)  # worker start-up is not throughput
        start = time.perf_counter()
        while seen < cfg.bench.loader_images:
            try:
                images, _ = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            seen += images.shape[0]
        out[f"num_workers={workers}"] = seen / (time.perf_counter() - start)
    return out


def run(cfg: DictConfig) -> dict:
    if cfg.bench.threads:
        torch.set_num_threads(int(cfg.bench.threads))
    size, batch = int(cfg.bench.image_size), int(cfg.bench.batch_size)
    model = build_model(OmegaConf.merge(cfg.model, {"image_size": [size, size]})).train()
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    targets = random_targets(batch, size, cfg.bench.boxes_per_image, model.num_classes)
    fns = {}
    ref_name = None
    if cfg.bench.compare:
        fns["effdet"], ref_name = effdet_step(model, images, targets)
    fns["densekit"] = step_fn(lambda: sum(model(images, targets).values()), model.parameters())
    times = time_interleaved(fns, cfg.bench.warmup, cfg.bench.iters, lambda: None)
    result = {
        "model": cfg.model.name, "effdet": ref_name, "device": device_description(torch.device("cpu")),
        "torch": torch.__version__, "batch_size": batch, "image_size": size,
        "train_step": {k: stats(v, batch) for k, v in times.items()},
        "loader_images_per_s": time_loader(cfg, size),
    }
    return result


def report(r: dict) -> str:
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
    result = run(cfg)
    print(report(result))
    path = save_result(result, to_absolute_path(str(cfg.bench.output)) if cfg.bench.output else None)
    if path is not None:
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
