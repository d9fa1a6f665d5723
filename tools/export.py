"""Export a model to ONNX and check it against PyTorch with onnxruntime.

Usage::

    python tools/export.py model=efficientdet_d0 export.output=d0.onnx weights=/path/to/checkpoint.pth
    python tools/export.py model=efficientdet_d0 export.output=d0_nms.onnx export.postprocess=true
    python tools/export.py model=lraspp_mobilenet_v3_small export.output=lraspp.onnx image_size=[512,1024]

Prints the file, its size, the export time and the parity number; any expected failure (unknown checkpoint,
unsupported option, missing output directory, parity above ``export.atol``) is one ``error:`` line and exit code 1.
"""
from __future__ import annotations

import logging
import sys
import time

import hydra
from omegaconf import DictConfig

import densekit
from densekit.config import image_size_arg, register_configs
from densekit.deploy.onnx import ExportError, check_onnx, export_onnx
from densekit.modeling.build import build_with_weights

log = logging.getLogger("densekit.export")

# Errors a user can cause and fix from the command line: reported in one line, without a traceback.
USER_ERRORS = (ExportError, ValueError, FileNotFoundError, densekit.CheckpointError, AssertionError, ImportError)


def run(cfg: DictConfig) -> None:
    """Build, export and check; raises one of ``USER_ERRORS`` on a fixable problem."""
    if not cfg.export.output:
        raise ValueError("export.output is required, e.g. export.output=model.onnx")
    if cfg.weights:  # a densekit run's class count (and a zoo entry's config) come with its checkpoint
        model = build_with_weights(cfg.model, cfg.weights)[0].eval()
    else:
        model = densekit.build_model(cfg.model).eval()
        log.warning("no weights=<checkpoint>: exporting %s with freshly initialised weights", cfg.model.name)
    size = image_size_arg(cfg.image_size, model.config.image_size)
    start = time.perf_counter()
    path = export_onnx(model, cfg.export.output, size, cfg.export.batch, cfg.export.opset, cfg.export.postprocess)
    seconds = time.perf_counter() - start
    mib = path.stat().st_size / 2**20
    print(f"wrote {path} ({mib:.1f} MiB, {cfg.model.name} at {cfg.export.batch}x3x{size[0]}x{size[1]}, "
          f"opset {cfg.export.opset}, postprocess {cfg.export.postprocess}) in {seconds:.1f} s")
    if cfg.export.check:
        diff = check_onnx(model, path, size, atol=cfg.export.atol)
        print(f"onnxruntime vs PyTorch: max abs difference {diff:.3g} (atol {cfg.export.atol:g})")


register_configs()


@hydra.main(config_path="../conf", config_name="export", version_base=None)
def main(cfg: DictConfig) -> None:
    """Entry point: a fixable error exits with one line instead of a traceback."""
    try:
        run(cfg)
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
