"""``export.format=tensorrt``: a TensorRT engine built from densekit's ONNX graph by TensorRT's Python builder, on
the CUDA GPU that will run it (an engine is specific to its GPU and TensorRT version).

* fp32 (TF32 off); fp16 (``BuilderFlag.FP16``: TensorRT picks fp16 kernels where they are faster); int8 from NNCF's
  calibrated QDQ graph (explicit quantisation, the path TensorRT 10 recommends over its deprecated implicit
  calibrators), with ``INT8`` and ``FP16`` allowed for the layers left in float. TensorRT 11 dropped the precision
  flags (strongly typed networks only): fp16 there is refused with the fix (TensorRT 10), int8 keeps its float
  layers in fp32.
* ``export.postprocess=true`` keeps densekit's in-graph decoding and NMS (ONNX ``NonMaxSuppression``, which
  TensorRT runs as its own NMS layer), for deployments that read the boxes directly.

TensorRT engines have no metadata slot: the densekit description lies beside the engine as ``<engine>.json``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ...checkpoint.io import atomic_write
from .base import FORMATS, ArtifactError, ArtifactInfo, ExportFormat, ExportRequest, Runtime
from .onnx_format import quantize_onnx

WORKSPACE_BYTES = 4 << 30


def metadata_path(engine: Path) -> Path:
    """Where an engine's densekit description lies: ``d0.engine`` -> ``d0.engine.json``."""
    return engine.with_name(engine.name + ".json")


def _logger():  # one logger per process, as TensorRT asks
    import tensorrt as trt

    global _LOGGER
    if "_LOGGER" not in globals():
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def build_engine(onnx_bytes: bytes, precision: str, source: str) -> bytes:
    """A serialised engine for ``onnx_bytes`` at ``precision`` (``int8``: a QDQ graph)."""
    import tensorrt as trt

    builder = trt.Builder(_logger())
    network = builder.create_network(0)  # explicit batch: the only mode in TensorRT 10
    parser = trt.OnnxParser(network, _logger())
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT cannot parse the ONNX graph of {source}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    flags = trt.BuilderFlag
    if precision == "fp32" and hasattr(flags, "TF32"):
        config.clear_flag(flags.TF32)  # on by default on Ampere and newer: an fp32 engine computes in fp32
    if precision in ("fp16", "int8"):
        if hasattr(flags, "FP16"):  # TensorRT <= 10: weakly typed networks, precisions allowed by flags
            config.set_flag(flags.FP16)
            if precision == "int8":
                config.set_flag(flags.INT8)
        elif precision == "fp16":
            # TensorRT 11 builds strongly typed networks only: an fp16 engine needs a graph typed fp16.
            raise ArtifactError(f"TensorRT {trt.__version__} has no FP16 builder flag (strongly typed networks only); "
                                "install TensorRT 10 for fp16 engines: pip install 'tensorrt-cu13<11' (or cu12)")
        # (int8 on TensorRT 11: the QDQ graph states its precisions itself, and the float layers stay fp32.)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ArtifactError(f"TensorRT failed to build an engine for {source} (its log above says why)")
    return bytes(engine)


class TensorRtRuntime(Runtime):
    """A deserialised engine with one execution context on the current CUDA device; runs on torch's stream."""

    def __init__(self, path: Path) -> None:
        import tensorrt as trt

        meta = metadata_path(path)
        if not meta.is_file():
            raise ArtifactError(f"{path}: its densekit description {meta.name} is missing (tools/export.py writes "
                                "both; an engine built elsewhere cannot be run by densekit)")
        super().__init__(path, ArtifactInfo.from_json(meta.read_text(), meta))
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.engine = trt.Runtime(_logger()).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT cannot deserialise {path}: truncated, or built by another TensorRT version "
                                "or for another GPU; build it again here with tools/export.py export.format=tensorrt")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.outputs = [(n, tuple(self.engine.get_tensor_shape(n)), _torch_dtype(self.engine.get_tensor_dtype(n)))
                        for n in self.info.outputs]

    def run(self, images: torch.Tensor) -> list[torch.Tensor]:
        stream = torch.cuda.current_stream(self.device)
        self.context.set_tensor_address(self.input_name, images.data_ptr())
        results = []
        for name, shape, dtype in self.outputs:
            out = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            results.append(out)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ArtifactError(f"TensorRT failed to run {self.path}")
        return results


def _torch_dtype(trt_dtype: object) -> torch.dtype:
    import tensorrt as trt

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.bool: torch.bool}
    return table[trt_dtype]


class TensorRtFormat(ExportFormat):
    name = "tensorrt"
    suffix = ".engine"
    runtime_name = "tensorrt"
    precisions = ("fp32", "fp16", "int8")

    def missing(self) -> str | None:
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt not installed (pip install tensorrt, on a machine with an NVIDIA GPU)"
        if not torch.cuda.is_available():
            return "TensorRT needs a CUDA GPU and this machine has none (use export.format=openvino or onnx on a CPU)"
        return None

    def export(self, request: ExportRequest, info: ArtifactInfo) -> Path:
        data = request.fp32_onnx()
        if request.precision == "int8":
            data = quantize_onnx(data, request, info)
        engine = build_engine(data, request.precision, info.model_name)
        # The description first, then the engine: an engine never appears without it.
        with atomic_write(metadata_path(request.output), "w") as f:
            f.write(info.to_json())
        with atomic_write(request.output) as f:
            f.write(engine)
        return request.output

    def load(self, path: Path) -> Runtime:
        return TensorRtRuntime(path)


FORMATS.register(TensorRtFormat.name)(TensorRtFormat())
