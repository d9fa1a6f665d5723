"""The device check's ``tensorrt`` step (issue 22): EfficientDet-D0 and ESeg-Lite-S as TensorRT fp16 engines, built
on the GPU by :mod:`densekit.deploy.formats`, timed against the PyTorch path and scored next to it on the synthetic
val splits. ``tools/device_check.py`` runs it (after the two target benchmarks) and records one step, ``tensorrt``,
with a result per model under ``models`` and the engines' FPS under ``summary`` (``<model>/network``, for the
targets).

Per model, in one process (``python tools/device_check_tensorrt.py WORK``, under the step's own timeout), each
model's result saved as soon as it is done (a timeout keeps the finished ones):

* **weights**: seeded random (seed 0) with the dataset's classes. No trained checkpoint travels to the device and
  training one to a meaningful AP takes longer than the whole check, so the AP / mIoU *levels* mean nothing; both
  paths run the very same weights, so their **difference** is what this step measures (what the engine's fp16
  costs), beside ``parity`` (raw outputs, :func:`~densekit.deploy.formats.artifact.compare_outputs`);
* **export**: ``export_artifact(model, "tensorrt", "<model>.engine", size, precision="fp16")``, timed (the ONNX
  export and TensorRT's build);
* **latency**: the PyTorch path (``optimize_for_inference``: BN folded, channels_last, eager, fp16 autocast,
  cudnn.benchmark; the compiled figures are the ``bench_*`` steps') and the engine's model, network only and end to
  end (densekit's decoding + NMS / argmax on the engine's outputs), batch 1, interleaved
  (:func:`densekit.benchmarks.timing.time_interleaved`);
* **accuracy**: the synthetic val split (all of it: 50 images; 40 for Cityscapes, resized to the engine's
  1024x2048 by ``data.eval_size``) through the task's evaluation, as ``tools/eval.py`` scores it: PyTorch in fp32
  (``tools/eval.py``'s path: BN folded, channels_last) and the engine.

Where TensorRT cannot run, the step is ``skipped`` with the reason (not ok: the check must not pass without it),
without starting a process. TensorRT is not among what ``--fetch-wheels`` carries: its libraries (libnvinfer and
its builder resources) are far larger than the 64 MiB a device call carries, so the GPU machine must have it
installed (``pip install tensorrt-cu13``, or ``-cu12``: matching torch's CUDA; TensorRT 10.x, see below).

Dry run (CPU): TensorRT needs CUDA, so the same code runs with ``export.format=onnx`` (onnxruntime, fp32; OpenVINO
fp16 where onnxruntime is missing) in its place, at tiny sizes (16-channel, one-repeat models; D0 at 64 px,
ESeg-Lite-S at 64x128 through ``data.eval_size`` as on the GPU; 4 val images; 1 timed call), inside the dry run's
benchmark worker process (imports cost 10 s a process on two cores). The record says so: ``format``,
``substitute_for``, ``why``.

TensorRT 11 removed ``BuilderFlag.FP16`` (strongly typed networks only), which ``tensorrt_format.build_engine``
sets for fp16: until it converts the graph itself, an fp16 build needs TensorRT 10.x; on 11 each model's record
says ``AttributeError`` and the step fails.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEP = "tensorrt"
TIMEOUT_S = 210  # on the GPU: two engine builds (about a minute each), two exports, timing and four evaluations
PLAN = "tensorrt_plan.json"  # the worker's input in the check's work folder
#: (name, data, engine input on the GPU, data overrides there, metric); the val split is the data's own.
JOBS = [
    ("efficientdet_d0", "synthetic", (512, 512), ["data.image_size=512"], "AP"),
    ("eseg_lite_s", "synthetic_cityscapes", (1024, 2048), ["data.eval_size=[1024,2048]"], "mIoU"),
]
#: The dry run's sizes and overrides (tests/gpu's CPU models: 16 channels, one repeat).
DRY_JOBS = {
    "efficientdet_d0": ((64, 64), ["data.image_size=64", "data.num_val=4", "model.neck.repeats=1",
                                   "model.neck.channels=16", "model.head.repeats=1"]),
    "eseg_lite_s": ((64, 128), ["data.eval_size=[64,128]", "data.num_val=4", "model.neck.repeats=1",
                                "model.neck.channels=16", "model.head.repeats=1", "model.head.channels=16"]),
}
#: CPU stand-ins for the dry run, first available wins: (format, precision, modules it needs). onnxruntime first:
#: the quickest to export and load (D0: 4 s against OpenVINO's 9 s on two cores); the step's code is the same.
SUBSTITUTES = [("onnx", "fp32", ("onnx", "onnxruntime", "onnxscript")),
               ("openvino", "fp16", ("openvino", "onnx", "onnxscript"))]


def _importable(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def plan(check: Any) -> dict[str, Any] | None:
    """Write the worker's plan into ``check.work``; ``None``, or the step's (skipped) record where it cannot run.

    Decided without importing torch (the driver never does): the format's modules found, and CUDA from the
    environment step's probe.
    """
    info = next((s.get("info") or {} for s in check.report["steps"] if s["name"] == "environment"), {})
    step: dict[str, Any] = {"name": STEP, "status": "skipped", "seconds": 0.0, "format": "tensorrt",
                            "precision": "fp16", "substitute_for": None}
    if check.dry_run:
        found = next((s for s in SUBSTITUTES if _importable(*s[2])), None)
        if found is None:
            return {**step, "reason": "dry run: no CUDA for TensorRT, and neither OpenVINO nor onnxruntime installed "
                                      "to stand in for it (pip install 'densekit[deploy]')"}
        step.update(format=found[0], precision=found[1], substitute_for="tensorrt",
                    why=f"dry run on the CPU: TensorRT needs CUDA; the same step runs with export.format={found[0]} "
                        f"({found[1]}) in its place, at tiny sizes")
    elif not info.get("cuda_available"):
        return {**step, "reason": "no CUDA device here (torch.cuda.is_available() is False): TensorRT needs one"}
    elif not _importable("tensorrt"):
        return {**step, "reason": "tensorrt is not installed here: pip install 'tensorrt-cu13<11' (or -cu12: "
                                  f"torch's CUDA is {info.get('cuda')}); too large for --fetch-wheels to carry"}
    jobs = []
    for name, data, size, overrides, metric in JOBS:
        if check.dry_run:
            size, overrides = DRY_JOBS[name]
        jobs.append({"name": name, "data": data, "size": list(size), "overrides": overrides, "metric": metric})
    spec = {k: step[k] for k in ("format", "precision", "substitute_for")} | {
        "dry_run": check.dry_run, "device": "cpu" if check.dry_run else "cuda", "jobs": jobs,
        "warmup": 1 if check.dry_run else 20, "iters": 1 if check.dry_run else 100,
        "eval_batch": 4 if check.dry_run else 8,
    }
    (check.work / PLAN).write_text(json.dumps({**spec, "why": step.get("why")}))
    return None


def run_step(check: Any, worker: Callable[[], dict[str, Any]] | None = None) -> None:
    """Plan, run and record the step: in a process of its own under :data:`TIMEOUT_S`, or (dry run) by ``worker``,
    which runs the plan among other work (the benchmarks' worker process) and returns that process's step record."""
    skipped = plan(check)
    done: dict[str, Any] = {}
    if worker is not None:  # runs the other work even when this step is skipped
        done = worker()
    elif skipped is None:
        done = check.run(STEP, [sys.executable, str(Path(__file__).resolve()), str(check.work)], TIMEOUT_S)
    check.record(skipped or collect(check, done))


def collect(check: Any, worker: dict[str, Any]) -> dict[str, Any]:
    """The step's record from the plan, each model's result file and the step record of the process that ran them:
    its own (status, time, command and, unless ok, output), or the dry run's benchmark worker (``ran_in``), whose
    benchmarks' outcome is theirs: this step's status and time are then its models' alone."""
    spec = json.loads((check.work / PLAN).read_text())
    shared = worker.get("name") != STEP
    step: dict[str, Any] = {"name": STEP, "status": "ok" if shared else worker["status"]}
    step.update({k: worker[k] for k in ("seconds", "command", "reason", "returncode") if k in worker and not shared})
    step.update({k: spec[k] for k in ("format", "precision", "substitute_for", "why")}, models={}, summary={})
    if shared:
        step["ran_in"] = worker.get("name")
    for job in spec["jobs"]:
        path = check.work / f"{STEP}_{job['name']}.json"
        result = json.loads(path.read_text()) if path.exists() else {
            "status": "failed", "reason": f"no result: the process ended first ({worker.get('status')})"}
        step["models"][job["name"]] = result
        for mode, s in result.get("timing", {}).get("results", {}).get(spec["format"], {}).items():
            step["summary"][f"{job['name']}/{mode}"] = {"median_ms": s["median_ms"], "fps": 1000.0 / s["median_ms"]}
    if shared:
        step["seconds"] = round(sum(r.get("seconds", 0.0) for r in step["models"].values()), 1)
    bad = [name for name, r in step["models"].items() if r["status"] != "ok"]
    if step["status"] == "ok" and bad:
        step.update(status="failed", reason=f"not ok: {', '.join(bad)} (see models)")
    if step["status"] != "ok":
        step["output_tail"] = worker.get("output_tail", "")
    return step


# ---- the worker: everything below runs in the step's own process (or the dry run's benchmark worker) ----


def run_plan(work: Path) -> int:
    """Run every model of ``work/PLAN``; each writes ``tensorrt_<model>.json`` ({status, seconds, ...})."""
    from densekit.utils.files import atomic_save_json

    spec = json.loads((work / PLAN).read_text())
    for job in spec["jobs"]:
        start = time.monotonic()
        try:
            result = {"status": "ok", **run_job(job, spec, work)}
        except Exception as err:  # noqa: BLE001 - recorded as this model's failure; the next one runs
            result = {"status": "failed", "reason": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc()[-2000:]}
            print(f"=== {STEP} {job['name']} FAILED: {result['reason']}", flush=True)
        result["seconds"] = round(time.monotonic() - start, 1)
        atomic_save_json(result, work / f"{STEP}_{job['name']}.json")
    return 0


def run_job(job: dict[str, Any], spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """One model: build, export, parity, interleaved timing, and both paths' evaluation."""
    import contextlib

    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from densekit.benchmarks.timing import stats, synchronizer, time_interleaved
    from densekit.config import register_configs
    from densekit.deploy.formats import FORMATS, export_artifact, load_artifact_model
    from densekit.deploy.formats.artifact import compare_outputs
    from densekit.deploy.optimize import optimize_for_inference
    from densekit.modeling.build import build_model
    from densekit.tasks import get_task

    fmt, device, size = spec["format"], torch.device(spec["device"]), tuple(job["size"])
    FORMATS.get(fmt).check_available()
    register_configs()
    overrides = [f"model={job['name']}", f"data={job['data']}", "data.num_train=0",  # the val split is the same
                 f"eval.batch_size={spec['eval_batch']}", "eval.num_workers=0", *job["overrides"]]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("eval", overrides=overrides)
    task = get_task(cfg)
    dataset = task.build_dataset(cfg, cfg.data.split, train=False)
    OmegaConf.update(cfg, "model.num_classes", task.num_classes(dataset))
    OmegaConf.update(cfg, "model.class_names", task.class_names(dataset), force_add=True)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval().to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as bench.optimize: cuDNN picks its kernels, as TensorRT does

    path = work / f"{job['name']}{FORMATS.get(fmt).suffix}"
    start = time.monotonic()
    export_artifact(model, fmt, path, size, precision=spec["precision"])
    export_s = time.monotonic() - start
    engine = load_artifact_model(path).to(device)
    fast = optimize_for_inference(model, channels_last=True, fold_bn=True)  # tools/eval.py's PyTorch path

    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1)).to(device)
    parity = compare_outputs(model, engine, images)
    images_cl = images.contiguous(memory_format=torch.channels_last)
    half = device.type == "cuda"  # the PyTorch path timed in fp16 autocast on the GPU, as the benchmarks
    amp = (lambda: torch.autocast("cuda", dtype=torch.float16)) if half else contextlib.nullcontext

    def under_amp(fn):
        def call():
            with amp():
                return fn()
        return call

    fns = {
        "pytorch/network": under_amp(lambda: fast.forward_raw(images_cl)),
        "pytorch/end_to_end": under_amp(lambda: fast(images_cl)),
        f"{fmt}/network": lambda: engine.forward_raw(images),
        f"{fmt}/end_to_end": lambda: engine(images),
    }
    with torch.inference_mode():
        times = time_interleaved(fns, spec["warmup"], spec["iters"], synchronizer(device))
    results: dict[str, dict[str, Any]] = {}
    for key, t in times.items():
        impl, mode = key.split("/")
        results.setdefault(impl, {})[mode] = stats(t, 1)
    speedup = {mode: results["pytorch"][mode]["median_ms"] / results[fmt][mode]["median_ms"] for mode in results[fmt]}

    loader = task.build_loader(dataset, int(cfg.eval.batch_size), False, 0, False)
    scores = {}
    for impl, net in (("pytorch", fast), (fmt, engine)):
        out_dir = work / f"eval_{job['name']}_{impl}"
        out_dir.mkdir(parents=True, exist_ok=True)
        with torch.inference_mode():
            scores[impl] = float(task.make_evaluate(cfg, dataset, loader, device, out_dir)(net)[job["metric"]])
    metric = job["metric"]
    print(f"=== {STEP} {job['name']} {size[0]}x{size[1]}: {fmt} {spec['precision']} network "
          f"{results[fmt]['network']['median_ms']:.2f} ms vs PyTorch {results['pytorch']['network']['median_ms']:.2f} "
          f"ms ({speedup['network']:.2f}x); {metric} {scores[fmt]:.4f} vs {scores['pytorch']:.4f}", flush=True)
    return {
        "model": job["name"], "image_size": list(size), "batch": 1, "format": fmt, "precision": spec["precision"],
        "export_s": round(export_s, 1), "artifact_mib": round(path.stat().st_size / 2**20, 2),
        "parity": parity,
        "timing": {
            "warmup": spec["warmup"], "iters": spec["iters"], "results": results, "speedup": speedup,
            "pytorch": ("optimize_for_inference (BN folded, channels_last), eager, "
                        + ("fp16 autocast, cudnn.benchmark" if half else "fp32")),
        },
        "accuracy": {
            "metric": metric, "data": job["data"], "split": str(cfg.data.split), "images": len(dataset),
            "pytorch": scores["pytorch"], fmt: scores[fmt], "difference": scores[fmt] - scores["pytorch"],
            "pytorch_precision": "fp32 (tools/eval.py's path)",
            "weights": "random (seed 0), the same in both paths: the difference is the measure, not the level",
        },
    }


if __name__ == "__main__":
    sys.exit(run_plan(Path(sys.argv[1])))
