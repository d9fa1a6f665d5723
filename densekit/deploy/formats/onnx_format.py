"""``export.format=onnx``: an ONNX graph run by onnxruntime; fp32 (torch's exporter) or int8 (NNCF's QDQ graph)."""
from __future__ import annotations

from pathlib import Path

import torch

from ...checkpoint.io import atomic_write
from ..onnx import with_metadata
from .base import (
    FORMATS, METADATA_KEY, ArtifactError, ArtifactInfo, ExportFormat, ExportRequest, Runtime, missing_modules,
)
from .calibration import calibration_inputs, nncf_quantize, output_producers

class OnnxRuntime(Runtime):
    """An ONNX artifact in an onnxruntime CPU session (all graph optimisations on)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Without this onnxruntime's worker threads spin-wait after every run, taking the cores from what runs next:
        # densekit's own post-processing (measured: Lite0 320 end to end and the next network call both slower).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for unreadable / invalid graphs
            raise ArtifactError(f"cannot load {path} in onnxruntime ({type(err).__name__}: {err}); is the file "
                                "complete? export it again with tools/export.py") from err
        meta = session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ArtifactError(f"{path} is an ONNX file without densekit metadata (not written by tools/export.py)")
        super().__init__(path, ArtifactInfo.from_json(meta[METADATA_KEY], path))
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def run(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(out) for out in self.session.run(None, {self.input_name: images.numpy()})]


class OnnxFormat(ExportFormat):
    name = "onnx"
    suffix = ".onnx"
    runtime_name = "onnxruntime"
    precisions = ("fp32", "int8")

    def missing(self) -> str | None:
        return missing_modules("onnx", "onnxruntime", "onnxscript")

    def export(self, request: ExportRequest, info: ArtifactInfo) -> Path:
        data = request.fp32_onnx()
        if request.precision == "int8":
            data = quantize_onnx(data, request, info)
        data = with_metadata(data, {METADATA_KEY: info.to_json()})
        with atomic_write(request.output) as f:
            f.write(data)
        return request.output

    def load(self, path: Path) -> Runtime:
        return OnnxRuntime(path)


def quantize_onnx(model_bytes: bytes, request: ExportRequest, info: ArtifactInfo) -> bytes:
    """The fp32 graph ``model_bytes`` quantised by NNCF (QDQ), its output layers kept in float."""
    import onnx

    proto = onnx.load_from_string(model_bytes)
    outputs = {o.name for o in proto.graph.output}
    keep = output_producers([n for n in proto.graph.node if outputs & set(n.output)], lambda node: node.name)
    name = proto.graph.input[0].name
    quantized = nncf_quantize(proto, calibration_inputs(request, info), keep, feed=lambda images: {name: images},
                              per_tensor_activations=True)
    return quantized.SerializeToString()


FORMATS.register(OnnxFormat.name)(OnnxFormat())
