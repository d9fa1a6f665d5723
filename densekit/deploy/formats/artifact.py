"""An exported artifact as a densekit model: the PyTorch path's pre- and post-processing around the artifact's network.

Both meta-architectures route every forward pass through their compile targets (``network``; a segmenter's
``predict_labels`` too: see :func:`densekit.modeling.base.compile_target`): pure tensor functions from a stacked
batch to raw outputs. :func:`load_artifact_model` builds the model the artifact's metadata describes and replaces
those targets with :class:`ArtifactNetwork`, which runs the artifact. Input checks, anchors, decoding, NMS,
original-image pixels, label maps and the evaluation loops are then the PyTorch path's own code, not a copy, and
everything that takes a densekit model (``tools/eval.py``, ``tools/predict.py``, :class:`densekit.Predictor`) takes
an artifact through ``weights=``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from .base import FORMATS, ArtifactError, ArtifactInfo, Runtime

log = logging.getLogger(__name__)


def format_of_path(path: str | os.PathLike) -> str | None:
    """The format whose artifact ``path`` names (by suffix: ``.onnx``, ``.xml``, ``.engine``), or ``None``."""
    suffix = Path(path).suffix.lower()
    return next((name for name in FORMATS if FORMATS.get(name).suffix == suffix), None)


def is_artifact(path: Any) -> bool:
    """Whether ``weights=path`` names an exported artifact rather than a checkpoint."""
    return isinstance(path, (str, os.PathLike)) and format_of_path(path) is not None


def load_runtime(path: str | os.PathLike) -> Runtime:
    """Load the artifact at ``path`` in its format's runtime (checks that it exists and that the runtime is here)."""
    path = Path(path).expanduser()
    name = format_of_path(path)
    if name is None:
        suffixes = ", ".join(f"{FORMATS.get(n).suffix} ({n})" for n in FORMATS)
        raise ArtifactError(f"{path}: not an exported artifact; expected one of {suffixes}")
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    fmt = FORMATS.get(name)
    reason = fmt.missing()
    if reason:
        raise ArtifactError(f"cannot run {path}: {reason}")
    return fmt.load(path)


class ArtifactNetwork(nn.Module):
    """A model's ``network`` run by an artifact: a stacked batch ``[n, 3, H, W]`` (float in [0, 1] or uint8, any
    device, any memory layout) -> the raw outputs ``network`` returns, on the batch's device.

    The artifact's batch size is fixed: larger batches run in chunks of it, and the last chunk is padded with
    zeros (the padded rows' outputs are dropped). A batch of another image size is refused, naming the file.
    """

    def __init__(self, runtime: Runtime, task: str) -> None:
        super().__init__()
        self.runtime = runtime
        self.info = runtime.info
        self.task = task

    def forward(self, batch: torch.Tensor) -> Any:
        info = self.info
        if tuple(batch.shape[1:]) != info.input_shape()[1:]:
            h, w = info.image_size
            raise ArtifactError(
                f"{self.runtime.path} was exported for {h}x{w} inputs, got {batch.shape[-2]}x{batch.shape[-1]}: "
                f"feed it {h}x{w} images (detection: data.image_size={h}; segmentation: data.eval_size=[{h},{w}]; "
                f"Predictor / tools/predict.py: image_size={h if h == w else [h, w]}), or export again at the size you "
                "need"
            )
        images = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
        images = images.to(self.runtime.device).contiguous()
        n, step = images.shape[0], info.batch
        pieces: list[list[torch.Tensor]] = []
        for start in range(0, n, step):
            chunk = images[start:start + step]
            if chunk.shape[0] < step:  # the artifact's batch is fixed: pad, then drop the padded rows' outputs
                chunk = torch.cat([chunk, chunk.new_zeros((step - chunk.shape[0], *chunk.shape[1:]))])
            pieces.append(self.runtime.run(chunk))
        # (one chunk: no cat, which would copy the outputs and could lose their channels-last layout)
        joined = pieces[0] if len(pieces) == 1 else [torch.cat(parts) for parts in zip(*pieces)]
        outputs = [out[:n].to(batch.device) for out in joined]
        return self._arrange(outputs)

    def _arrange(self, outputs: list[torch.Tensor]) -> Any:
        """The artifact's flat outputs in the layout of the model's ``network``."""
        if self.task == "segmentation":
            return outputs[0]
        levels = len(outputs) // 2  # detection: cls_p3..cls_pN, then box_p3..box_pN
        return outputs[:levels], outputs[levels:]


def _build_shell(model_cfg: Any) -> nn.Module:
    """The densekit model ``model_cfg`` describes, without initialising its weights: the artifact computes the
    network, so only the model's configuration, anchors and post-processing are used. The parameters are allocated
    (``to_empty``) so that the model still moves between devices like any other."""
    from ...modeling.build import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    return model.to_empty(device="cpu")


def load_artifact_model(path: str | os.PathLike, expected: Any = None) -> nn.Module:
    """A densekit model (eval mode) whose network is the artifact at ``path``.

    Args:
        path: ``.onnx`` (onnxruntime), ``.xml`` (OpenVINO) or ``.engine`` (TensorRT).
        expected: The model config the caller asked for (e.g. a tool's ``cfg.model``): an artifact of another model
            is refused, naming both. ``None`` takes the artifact's own.

    The model's ``config`` is the one recorded at export (class names, image size, post-processing settings);
    ``model.artifact`` is the :class:`ArtifactNetwork`. Its PyTorch parameters are uninitialised placeholders:
    only the artifact computes.

    Raises:
        ArtifactError: missing, truncated or foreign file, runtime not installed, or another model than ``expected``.
    """
    runtime = load_runtime(path)
    info = runtime.info
    if expected is not None and expected.get("name") not in (None, info.model_name):
        raise ArtifactError(
            f"{runtime.path} is an artifact of {info.model_name} (exported at {info.image_size[0]}x{info.image_size[1]}, "
            f"{info.model.get('num_classes')} classes), not {expected.get('name')}: pass model={info.model_name}"
        )
    from ...tasks import task_of_model

    cfg = OmegaConf.create(info.model)
    model = _build_shell(cfg).eval()
    task = task_of_model(model.config).name
    if info.postprocess:
        raise ArtifactError(
            f"{runtime.path} has detection post-processing in its graph (export.postprocess=true): it is for "
            "deployment runtimes that read its boxes directly; to run or evaluate it in densekit, export the network "
            "alone (export.postprocess=false), whose decoding and NMS densekit does"
        )
    network = ArtifactNetwork(runtime, task)
    model.artifact = network  # a child module: it moves and prints with the model
    # The compile targets are where every forward pass goes: shadow them on the instance with the artifact (a
    # function, so that it lands in the instance's __dict__, ahead of the class's method, as optimize's compile does).
    model.network = network.__call__
    if task == "segmentation":
        model.predict_labels = lambda batch: network(batch).argmax(1)
    log.info("loaded %s: %s %s, %s at %dx%d, batch %d", runtime.path, FORMATS.get(info.format).runtime_name,
             info.precision, info.model_name, *info.image_size, info.batch)
    return model


def artifact_of(model: nn.Module) -> ArtifactNetwork | None:
    """The artifact a model built by :func:`load_artifact_model` runs, else ``None``."""
    return getattr(model, "artifact", None)


@torch.no_grad()
def compare_outputs(model: nn.Module, artifact_model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """How far an artifact's raw outputs are from ``model``'s (PyTorch) on ``images``, over all outputs: ``max_abs``
    (largest absolute difference), ``scale`` (largest PyTorch magnitude) and ``mean_rel`` (mean absolute difference
    over the mean PyTorch magnitude: what int8 / fp16 artifacts are judged by)."""
    model.eval()
    want = torch.utils._pytree.tree_leaves(model.forward_raw(images))
    got = torch.utils._pytree.tree_leaves(artifact_model.forward_raw(images))
    if [tuple(t.shape) for t in want] != [tuple(g.shape) for g in got]:
        raise ArtifactError(f"the artifact's outputs {[tuple(g.shape) for g in got]} do not match the model's "
                            f"{[tuple(t.shape) for t in want]}")
    diff = sum(float((g.float() - t.float()).abs().sum()) for g, t in zip(got, want))
    magnitude = sum(float(t.float().abs().sum()) for t in want)
    return {
        "max_abs": max(float((g.float() - t.float()).abs().max()) for g, t in zip(got, want)),
        "scale": max(float(t.abs().max()) for t in want),
        "mean_rel": diff / max(magnitude, 1e-12),
    }
