"""Quantise a trained model to int8 and say what it costs and gains:
``densekit quantize model=efficientdet_lite0 weights=run/checkpoints/last.pth data=synthetic`` (``python
tools/quantize.py`` in a checkout).

Calibrates on ``quantize.calibration_images`` train-split images, evaluates fp32 and int8 on ``data.split`` (COCO AP
or mIoU, the task's own evaluation), times both end to end interleaved in one run, saves the int8 network as a
``torch.export`` program (``quantize.output``, under the run directory) and prints a one-screen summary.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from densekit.benchmarks.timing import cpu_name, stats, synchronizer, time_interleaved
from densekit.cli.errors import UsageError, reports_user_errors, run_tool
from densekit.config import register_configs
from densekit.deploy.optimize import optimize_for_inference
from densekit.deploy.quantize import calibration_set, save_quantized
from densekit.modeling.model_spec import finish_run_config
from densekit.tasks import get_task
from densekit.utils.files import atomic_save_json

log = logging.getLogger("densekit.quantize")


def quantize_run(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    task, q = get_task(cfg), cfg.quantize
    if not cfg.weights and not cfg.eval.allow_random_weights:
        raise UsageError("tools/quantize.py needs weights=<checkpoint> (or eval.allow_random_weights=true)")
    spec = finish_run_config(cfg, prefer_ema=cfg.eval.ema)  # datasets and calibration images from its config
    dataset = task.build_dataset(cfg, cfg.data.split, train=False)
    model, what = spec.build(), spec.description
    task.check_model_fits_data(model, dataset)
    calibration = calibration_set(task, cfg, q.calibration_images)
    example = torch.utils.data.default_collate([calibration[0][0]] * int(q.bench_batch))
    fp32 = optimize_for_inference(model, compile=bool(q.compile), example_input=example, strict=True)
    keep = None if q.keep_float is None else list(q.keep_float)
    int8 = optimize_for_inference(
        model, compile=bool(q.compile), precision="int8", calibration=calibration,
        num_images=int(q.calibration_images), keep_float=keep,
    )
    log.info("quantised %s (%s) on %d calibration images", cfg.model.name, what, len(calibration))
    loader = task.build_loader(dataset, cfg.eval.batch_size, False, cfg.eval.num_workers, False)
    device = torch.device("cpu")
    metrics = {name: task.make_evaluate(cfg, dataset, loader, device, out_dir / name)(m)
               for name, m in (("fp32", fp32), ("int8", int8))}
    timing: dict[str, Any] = {}
    if q.iters:
        with torch.inference_mode():
            times = time_interleaved({"fp32": lambda: fp32(example), "int8": lambda: int8(example)},
                                     int(q.warmup), int(q.iters), synchronizer(device))
        timing = {name: stats(t, example.shape[0]) for name, t in times.items()}
    saved = out_dir / str(q.output)
    save_quantized(int8, saved)
    record = {"model": cfg.model.name, "weights": cfg.weights, "data": cfg.data.name, "split": cfg.data.split,
              "calibration_images": len(calibration), "cpu": cpu_name(), "threads": torch.get_num_threads(),
              "input": list(example.shape), "metrics": metrics, "timing": timing, "program": str(saved)}
    atomic_save_json(_plain(record), out_dir / "quantize.json")
    print(summary(task, record))
    return record


def _plain(value: Any) -> Any:
    """JSON-ready copy: metrics may hold numpy scalars / arrays."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.tolist() if hasattr(value, "tolist") else value


def summary(task: Any, r: dict[str, Any]) -> str:
    """The one screen: accuracy of each precision, its latency and the int8 / fp32 ratio."""
    lines = [f"model     {r['model']} ({r['weights'] or 'random weights'}), {r['data']} {r['split']}",
             f"int8      PT2E static (x86 inductor quantiser), {r['calibration_images']} train-split calibration images",
             f"cpu       {r['cpu']}, {r['threads']} threads, input {'x'.join(map(str, r['input']))}"]
    for name in ("fp32", "int8"):
        ms = r["timing"].get(name, {}).get("median_ms")
        lines.append(f"{name:<9} {task.headline(r['metrics'][name])}" + (f"   {ms:8.2f} ms (median)" if ms else ""))
    if r["timing"]:
        lines.append(f"int8 / fp32 latency {r['timing']['int8']['median_ms'] / r['timing']['fp32']['median_ms']:.2f}x "
                     "(both compiled with inductor freezing, interleaved in this run)")
    lines.append(f"saved     {r['program']}")
    return "\n".join(lines)


register_configs()


@hydra.main(config_path="../conf", config_name="quantize", version_base=None)
@reports_user_errors()
def hydra_main(cfg: DictConfig) -> None:
    quantize_run(cfg)


def main() -> None:
    """Entry point: a user's mistake is one ``error:`` block, exit code 2 (densekit.cli.errors)."""
    run_tool(hydra_main)


if __name__ == "__main__":
    main()
