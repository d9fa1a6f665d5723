"""Export a model as a deployment artifact and check it against PyTorch.

Usage (``python tools/export.py`` in a checkout takes the same overrides)::

    densekit export model=efficientdet_lite0 weights=run/checkpoints/last.pth image_size=256 \\
        export.format=openvino export.output=lite0.xml
    densekit export model=efficientdet_lite0 weights=... image_size=256 export.format=openvino \\
        export.precision=int8 export.output=lite0_int8.xml data=synthetic        # NNCF, calibrated on data's train split
    densekit export model=efficientdet_d0 export.format=tensorrt export.precision=fp16 export.output=d0.engine
    densekit export model=efficientdet_d0 export.output=d0_nms.onnx export.postprocess=true

``export.format`` is a name in :data:`densekit.deploy.formats.FORMATS` (onnx, openvino, tensorrt). The artifact then
runs like a checkpoint: ``tools/eval.py weights=lite0.xml`` scores it, ``tools/predict.py weights=lite0.xml`` and
``densekit.Predictor("lite0.xml")`` predict with it. Prints a summary (file, size, time, distance from PyTorch);
any expected failure (unknown checkpoint or format, missing runtime, unsupported option, missing output directory,
parity above ``export.atol``) is one ``error:`` block and exit code 2.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from densekit.cli.errors import reports_user_errors, run_tool
from densekit.config import image_size_arg, register_configs
from densekit.deploy.formats import FORMATS, export_artifact, load_artifact_model
from densekit.deploy.formats.artifact import compare_outputs
from densekit.deploy.onnx import ExportError
from densekit.deploy.quantize import calibration_set
from densekit.modeling.model_spec import finish_run_config
from densekit.tasks import get_task

log = logging.getLogger("densekit.export")


def calibration(cfg: DictConfig, size: tuple[int, int]) -> Any:
    """int8: the first ``export.calibration_images`` train-split images of ``cfg.data`` at the export size."""
    if cfg.export.precision != "int8":
        return None
    task = get_task(cfg)
    if task.name == "detection":  # the detection eval transform resizes to data.image_size: make it the export's
        if size[0] != size[1]:
            raise ValueError(f"a detector's input is square; got image_size {size[0]}x{size[1]}")
        cfg.data.image_size = size[0]
    return calibration_set(task, cfg, cfg.export.calibration_images)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build, export and check; raises a user error (densekit.cli.errors) on a fixable problem. Returns the summary fields."""
    e = cfg.export
    if not e.output:
        suffix = FORMATS.get(e.format).suffix if e.format in FORMATS else ".onnx"
        raise ValueError(f"export.output is required, e.g. export.output=model{suffix}")
    FORMATS.get(e.format).check_available()  # a missing runtime fails before any model is built
    # A densekit run's class count (and a zoo entry's config) come with its checkpoint; int8 calibration images are
    # built from the finished model config.
    spec = finish_run_config(cfg, prefer_ema=cfg.ema)
    if not cfg.weights:
        log.warning("no weights=<checkpoint>: exporting %s with freshly initialised weights", cfg.model.name)
    model = spec.build().eval()
    size = image_size_arg(cfg.image_size, model.config.image_size)
    start = time.perf_counter()
    path = export_artifact(model, e.format, e.output, size, e.precision, e.batch, e.postprocess,
                           calibration(cfg, size), e.calibration_images, e.opset)
    seconds = time.perf_counter() - start
    files = [path] + [p for p in (path.with_suffix(".bin"), path.with_name(path.name + ".json")) if p.is_file()]
    summary = {"file": str(path), "mib": sum(p.stat().st_size for p in files) / 2**20, "seconds": seconds}
    print(f"wrote {path} ({summary['mib']:.1f} MiB): {cfg.model.name} as {e.format} {e.precision}, input "
          f"{e.batch}x3x{size[0]}x{size[1]}, postprocess {e.postprocess}, in {seconds:.1f} s")
    if e.check and not e.postprocess:
        summary.update(check(model, path, size, e))
    elif e.check:
        print("check skipped: an artifact with post-processing in its graph runs outside densekit")
    return summary


def check(model: torch.nn.Module, path: Any, size: tuple[int, int], e: DictConfig) -> dict[str, float]:
    """Run the artifact as densekit loads it and PyTorch on the same images; fp32 must agree within ``e.atol``."""
    images = torch.rand(e.batch, 3, *size, generator=torch.Generator().manual_seed(0))
    gap = compare_outputs(model, load_artifact_model(path), images)
    runtime = FORMATS.get(e.format).runtime_name
    print(f"{runtime} vs PyTorch: max abs difference {gap['max_abs']:.3g} (outputs up to {gap['scale']:.3g}), "
          f"mean relative difference {gap['mean_rel']:.3g}")
    if e.precision == "fp32" and gap["max_abs"] > e.atol * max(gap["scale"], 1.0):
        raise ExportError(f"{path}: {runtime} differs from PyTorch by {gap['max_abs']:.3g} > export.atol "
                             f"{e.atol:g} x {max(gap['scale'], 1.0):.3g}; the artifact is kept for inspection")
    return gap


register_configs()


@hydra.main(config_path="../conf", config_name="export", version_base=None)
@reports_user_errors(also=(ExportError, ImportError))
def hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """Entry point: a user's mistake, a failed export or a missing runtime is one ``error:`` block, exit code 2
    (densekit.cli.errors)."""
    run_tool(hydra_main, also=(ExportError, ImportError))


if __name__ == "__main__":
    main()
