"""ONNX export of densekit models and a parity check against onnxruntime.

The exported graph takes ``images``: float ``[B, 3, H, W]`` in [0, 1] at a fixed batch and size; normalisation
(and padding to the backbone stride) is part of the graph, so a runtime feeds plain RGB in [0, 1].

* Detection, network only: ``cls_p3 .. cls_pN`` (``[B, A*C, h, w]`` logits) then ``box_p3 .. box_pN``
  (``[B, A*4, h, w]`` regressions), exactly :meth:`EfficientDet.forward_raw`.
* Detection with ``postprocess=True``: top-k, box decoding, clipping and class-wise hard NMS in the graph
  (``NonMaxSuppression``), as fixed-size outputs ``boxes [B, D, 4]``, ``scores [B, D]``, ``labels [B, D]`` (int64)
  and ``num_detections [B]`` (int64), with ``D = max_detections``; rows past ``num_detections`` are zeros.
* Segmentation: ``logits`` ``[B, C, H, W]``, exactly :meth:`Segmenter.forward_raw`.
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import nms

from ..checkpoint.io import atomic_write
from ..modeling.base import DenseModel
from ..modeling.detector import EfficientDet
from ..modeling.postprocess import flatten_levels
from ..modeling.segmenter import Segmenter

log = logging.getLogger(__name__)

POSTPROCESS_OUTPUTS = ("boxes", "scores", "labels", "num_detections")


class ExportError(RuntimeError):
    """A model (or option) that this exporter cannot turn into a correct ONNX graph."""


class _DetectionNet(nn.Module):
    """``forward_raw`` of a detector with flat outputs: every level's class logits, then every level's boxes."""

    def __init__(self, model: EfficientDet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cls_out, box_out = self.model.forward_raw(images)
        return (*cls_out, *box_out)


class _SegmentationNet(nn.Module):
    """``forward_raw`` of a segmenter."""

    def __init__(self, model: Segmenter) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_raw(images)


class _DetectionWithNms(nn.Module):
    """The detector's eval-mode post-processing (hard NMS) written with static shapes, so that it exports.

    The candidates (top-k, decoding, clipping) are the eval path's own
    (:meth:`~densekit.modeling.postprocess.DetectionPostprocessor.candidates`, with its traceable full sort). Only
    the NMS differs: the eval path returns a variable number of boxes per image through ``batched_nms`` and Python
    loops; here the batch size and image size are fixed at export time, anchors and clip limits become constants,
    class-wise NMS uses the coordinate-offset trick (one ``torchvision.ops.nms`` per image, which maps to ONNX
    ``NonMaxSuppression``) and results are padded to ``max_detections``.
    """

    def __init__(self, model: EfficientDet, image_size: tuple[int, int]) -> None:
        super().__init__()
        post = model.postprocessor
        if post.soft_nms:
            raise ExportError(
                "postprocess=True supports hard NMS only: soft-NMS rescores candidates in a loop the ONNX graph "
                "would have to unroll max_detections times (export with postprocess=False, or set "
                "model.postprocess.soft_nms=false)"
            )
        self.model = model
        self.post = post
        d = model.size_divisor
        padded = (-(-image_size[0] // d) * d, -(-image_size[1] // d) * d)
        # Constants of the graph: anchors depend only on the (padded) input size, fixed at export.
        self.register_buffer("anchors", model.anchor_generator(padded, "cpu").clone(), persistent=False)
        h, w = image_size
        self.register_buffer("limits", torch.tensor([w, h, w, h], dtype=torch.float32), persistent=False)
        # Boxes are clipped to [0, max(H, W)]: shifting each class by more than that keeps classes apart in NMS.
        self.class_shift = float(max(h, w) + 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cls_out, box_out = self.model.forward_raw(images)
        boxes, scores, classes = self.post.candidates(
            flatten_levels(cls_out, self.model.num_classes), flatten_levels(box_out, 4), self.anchors, self.limits,
            traceable=True,
        )
        batch, most = boxes.shape[0], self.post.max_detections
        offset = classes.to(boxes.dtype)[..., None] * self.class_shift
        out_boxes, out_scores, out_labels, counts = [], [], [], []
        for b in range(batch):  # the batch is fixed at export, so this loop unrolls
            keep = nms(boxes[b] + offset[b], scores[b], self.post.nms_iou)
            # Pad with index 0 so that the first `most` entries always exist, then mask the padding.
            # (built from tensors, not keep.shape[0], so that a tracing exporter cannot bake the count in).
            idx = torch.cat([keep, keep.new_zeros(most)])[:most]
            kept = torch.cat([torch.ones_like(keep, dtype=torch.bool), keep.new_zeros(most, dtype=torch.bool)])[:most]
            sc = scores[b, idx]
            # Sorted by score, so dropping low scores after NMS equals dropping them before: a box can only
            # suppress lower-scoring ones.
            valid = kept & (sc >= self.post.score_threshold)
            out_boxes.append(torch.where(valid[:, None], boxes[b, idx], 0.0))
            out_scores.append(torch.where(valid, sc, 0.0))
            out_labels.append(torch.where(valid, classes[b, idx], 0))
            counts.append(valid.sum())
        return torch.stack(out_boxes), torch.stack(out_scores), torch.stack(out_labels), torch.stack(counts)


def detection_export_module(model: EfficientDet, image_size: tuple[int, int], postprocess: bool) -> tuple[nn.Module, list[str]]:
    """A detector's module to trace: per-level logits and boxes, or (``postprocess``) fixed-size NMS outputs."""
    if postprocess:
        return _DetectionWithNms(model, image_size), list(POSTPROCESS_OUTPUTS)
    levels = range(model.neck.min_level, model.neck.max_level + 1)
    return _DetectionNet(model), [f"cls_p{lv}" for lv in levels] + [f"box_p{lv}" for lv in levels]


def segmentation_export_module(model: Segmenter, image_size: tuple[int, int], postprocess: bool) -> tuple[nn.Module, list[str]]:
    """A segmenter's module to trace: its logits at the input size."""
    if postprocess:
        raise ExportError("postprocess=True is for detectors; a segmenter exports its logits (argmax them at runtime)")
    return _SegmentationNet(model), ["logits"]


def _export_module(model: nn.Module, image_size: tuple[int, int], postprocess: bool) -> tuple[nn.Module, list[str]]:
    """The module to trace and its output names, from the model's task."""
    config = getattr(model, "config", None)
    if not isinstance(model, DenseModel) or config is None:
        raise ExportError(f"cannot export {type(model).__name__}: expected a densekit model built from a config")
    from ..tasks import task_of_model  # late: the tasks import data/ and evaluation/, which exporting never needs

    return task_of_model(config).export_module(model, image_size, postprocess)


def export_output_names(model: nn.Module, image_size: tuple[int, int], postprocess: bool) -> list[str]:
    """The names of the outputs ``model``'s exported graph has, in order."""
    return _export_module(model, image_size, postprocess)[1]


def _check_size(image_size: tuple[int, int], batch: int) -> tuple[int, int]:
    if len(image_size) != 2 or min(int(image_size[0]), int(image_size[1])) < 1:
        raise ValueError(f"image_size must be (H, W) with positive sides, got {image_size!r}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    return int(image_size[0]), int(image_size[1])


def _run_exporter(module: nn.Module, example: torch.Tensor, output_names: list[str], opset: int) -> bytes:
    """Trace ``module`` on ``example``; the serialised ONNX model.

    torch's dynamo exporter starts at opset 18 (it silently keeps 18 when asked for less and the down-conversion
    fails, as it does for ``Pad``), so lower opsets go through the TorchScript exporter, which emits them natively.
    Both map ``torchvision.ops.nms`` to ``NonMaxSuppression``.
    """
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / deprecation chatter about our static shapes is expected
        if opset >= 18:
            program = torch.onnx.export(
                module, (example,), input_names=["images"], output_names=output_names, opset_version=opset,
                dynamo=True, verbose=False,
            )
            if program is None:
                raise ExportError("torch.onnx.export returned no program")
            # One self-contained file: densekit models are far below ONNX's 2 GB protobuf limit.
            return program.model_proto.SerializeToString()
        buffer = io.BytesIO()
        torch.onnx.export(
            module, (example,), buffer, input_names=["images"], output_names=output_names, opset_version=opset,
            dynamo=False, do_constant_folding=True,
        )
        return buffer.getvalue()


def _onnx_opset(model_bytes: bytes) -> int:
    """The default-domain opset a serialised ONNX model declares."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def onnx_model_bytes(
    model: nn.Module, image_size: tuple[int, int], batch: int = 1, opset: int = 17, postprocess: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """The serialised ONNX graph of ``model`` (see :func:`export_onnx`), with ``metadata`` in its ``metadata_props``."""
    h, w = _check_size(image_size, batch)
    model.eval()
    module, output_names = _export_module(model, (h, w), postprocess)
    # The wrapper too: a TorchScript export restores the mode of the module it traced, and a wrapper left in
    # training mode would switch the model back to training (batch statistics) after the export.
    module.eval()
    device = next(model.parameters()).device
    module.to(device)
    example = torch.rand(batch, 3, h, w, device=device)
    try:
        model_bytes = _run_exporter(module, example, output_names, opset)
        written = _onnx_opset(model_bytes)
    except ExportError:
        raise
    except Exception as err:  # the exporter raises many types; callers need one, with the cause attached
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {type(err).__name__}: {err}") from err
    if written != opset:  # the exporter may keep a newer opset when it cannot convert down: say so, not ship it
        raise ExportError(f"asked for opset {opset}, torch's exporter produced opset {written}")
    return with_metadata(model_bytes, metadata) if metadata else model_bytes


def with_metadata(model_bytes: bytes, metadata: Mapping[str, str]) -> bytes:
    """``model_bytes`` with ``metadata`` set in the graph's ``metadata_props`` (existing keys replaced)."""
    import onnx

    proto = onnx.load_from_string(model_bytes)
    kept = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    image_size: tuple[int, int],
    batch: int = 1,
    opset: int = 17,
    postprocess: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Export ``model`` (a densekit detector or segmenter) to ONNX at a fixed batch size and input size.

    Args:
        model: The model; it is put in eval mode (BatchNorm folds to its running statistics).
        path: Output ``.onnx`` file; written atomically (a partial file never appears under this name).
        image_size: Input ``(H, W)``.
        batch: Batch size baked into the graph.
        opset: ONNX opset version.
        postprocess: Detectors only: include top-k, decoding and hard NMS (see the module docstring).
        metadata: Key / value strings stored in the graph's ``metadata_props`` (densekit's artifact description).

    Returns:
        The path written.

    Raises:
        ExportError: The model or option cannot be exported (e.g. soft-NMS post-processing, a segmenter with
            ``postprocess=True``, or an operator torch's exporter does not support).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory {path.parent} does not exist")
    model_bytes = onnx_model_bytes(model, image_size, batch, opset, postprocess, metadata)
    # The graph is checked before anything is written; the file then appears whole or not at all.
    with atomic_write(path) as f:
        f.write(model_bytes)
    log.debug("exported %s to %s (%d bytes)", getattr(getattr(model, "config", None), "name", type(model).__name__),
             path, path.stat().st_size)
    return path


def check_onnx(model: nn.Module, path: str | os.PathLike, image_size: tuple[int, int], atol: float = 1e-4) -> float:
    """Run the ONNX file in onnxruntime and PyTorch on one random input; the max abs difference over all outputs.

    The batch size and whether the graph includes post-processing are read from the file. Integer outputs
    (labels, counts) must match exactly; a mismatch there counts as an infinite difference. With post-processing
    this needs distinct scores: an untrained head scores every candidate alike, and rounding-level differences
    between the runtimes then reorder top-k / NMS (the error says when that is the likely cause).

    Raises:
        ImportError: onnxruntime is not installed.
        AssertionError: The difference is above ``atol`` (or the outputs disagree in shape).
    """
    import numpy as np
    import onnxruntime as ort

    h, w = _check_size(image_size, 1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    batch = inp.shape[0] if isinstance(inp.shape[0], int) else 1
    names = [o.name for o in session.get_outputs()]
    model.eval()
    module, expected_names = _export_module(model, (h, w), postprocess=names == list(POSTPROCESS_OUTPUTS))
    if names != expected_names:
        raise AssertionError(f"{path} has outputs {names}, the model would export {expected_names}")
    device = next(model.parameters()).device
    module.to(device)
    images = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    got = session.run(None, {inp.name: images.numpy()})
    with torch.no_grad():
        want = module(images.to(device))
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    worst = 0.0
    for name, g, t in zip(names, got, want):
        t = t.cpu().numpy()
        if g.shape != t.shape:
            raise AssertionError(f"output {name}: onnxruntime shape {g.shape}, PyTorch {t.shape}")
        if np.issubdtype(t.dtype, np.integer):
            diff = 0.0 if np.array_equal(g, t) else float("inf")
        else:
            diff = float(np.abs(g.astype(np.float64) - t.astype(np.float64)).max(initial=0.0))
        worst = max(worst, diff)
    if worst > atol:
        hint = ""
        if names == list(POSTPROCESS_OUTPUTS):
            # Why: a fresh head scores every candidate ~sigmoid(prior bias); rounding-level differences then reorder
            # near-ties, which changes top-k and NMS. That is a property of the weights, not a wrong graph.
            gaps = np.diff(np.sort(want[1].cpu().numpy().ravel()))
            tied = int((gaps[gaps > 0] < 1e-6).sum()) if gaps.size else 0
            hint = (f" ({tied} near-tied scores in the top detections: expected with untrained weights; check "
                    "with a trained checkpoint, or check the network alone with postprocess=False)") if tied else ""
        raise AssertionError(f"ONNX parity failed for {path}: max abs difference {worst:.3g} > atol {atol:g}{hint}")
    return worst
