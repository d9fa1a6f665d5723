"""``export.format=openvino``: OpenVINO IR (``model.xml`` + ``model.bin``) converted by OpenVINO's own converter from
densekit's ONNX graph; fp32, fp16 (fp16 weights; the CPU plugin may compute in bf16 where the CPU has it) or int8
(NNCF post-training quantisation).

Precision at run time: an fp32 artifact runs with ``INFERENCE_PRECISION_HINT=f32``. OpenVINO's CPU plugin otherwise
picks bf16 by itself on CPUs with AVX512-BF16 / AMX, which is faster but no longer the fp32 model's numbers; the
fp16 artifact is the one that allows it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .base import (
    FORMATS, METADATA_KEY, ArtifactError, ArtifactInfo, ExportFormat, ExportRequest, Runtime, missing_modules,
)
from .calibration import calibration_inputs, nncf_quantize, output_producers


#: OpenVINO element type names -> numpy dtypes, for the output buffers.
_NUMPY_DTYPES = {"f32": np.float32, "f16": np.float16, "i64": np.int64, "i32": np.int32}


class OpenVinoRuntime(Runtime):
    """An OpenVINO IR compiled for the CPU with the latency hint (one request, all cores on it)."""

    def __init__(self, path: Path) -> None:
        import openvino as ov

        core = ov.Core()
        weights = path.with_suffix(".bin")
        if not weights.is_file():
            raise ArtifactError(f"{path}: its weights file {weights.name} is missing (an OpenVINO IR is the .xml and "
                                "the .bin beside it)")
        try:
            model = core.read_model(str(path))
        except Exception as err:  # OpenVINO raises RuntimeError subclasses for unreadable IR
            raise ArtifactError(f"cannot read {path} with OpenVINO ({type(err).__name__}: {err}); export it again "
                                "with tools/export.py") from err
        if not model.has_rt_info(METADATA_KEY):
            raise ArtifactError(f"{path} is an OpenVINO IR without densekit metadata (not written by tools/export.py)")
        super().__init__(path, ArtifactInfo.from_json(model.get_rt_info(METADATA_KEY).astype(str), path))
        self.nhwc = bool(self.info.outputs) and self.info.outputs[0].startswith("cls_p")  # detection outputs
        if self.nhwc:
            model = _channels_last_outputs(model)
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if self.info.precision == "fp32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as err:
            raise ArtifactError(f"OpenVINO cannot compile {path} for the CPU ({type(err).__name__}: {err})") from err
        self.request = self.compiled.create_infer_request()
        self.output_specs = [(tuple(out.get_shape()), _NUMPY_DTYPES[out.get_element_type().get_type_name()])
                             for out in self.compiled.outputs]

    def run(self, images: torch.Tensor) -> list[torch.Tensor]:
        import openvino as ov

        # Fresh output buffers each call, which OpenVINO writes into: results stay valid after the next call
        # without copying them out of the request's own buffers.
        buffers = [np.empty(shape, dtype=dtype) for shape, dtype in self.output_specs]
        for i, buffer in enumerate(buffers):
            self.request.set_output_tensor(i, ov.Tensor(buffer, shared_memory=True))
        # The request keeps pointing at these until the next call binds new ones, and an ov.Tensor does not own
        # the memory it shares: hold the arrays for that long.
        self._bound = buffers
        self.request.infer({0: images.numpy()}, share_inputs=True)
        outputs = [torch.from_numpy(b) for b in buffers]
        return [o.permute(0, 3, 1, 2) if self.nhwc else o for o in outputs]


def _channels_last_outputs(model: object) -> object:
    """``model`` with its 4-d outputs written channels-last (NHWC): the detection post-processing reads every
    anchor's class scores as one row, which from NCHW outputs costs a transposing copy of all of them (1.73M
    values for a 90-class Lite0) and from NHWC ones is a view. OpenVINO writes either layout from its blocked
    internal one, at the same cost."""
    import openvino as ov

    ppp = ov.preprocess.PrePostProcessor(model)
    for i in range(len(model.outputs)):
        ppp.output(i).model().set_layout(ov.Layout("NCHW"))
        ppp.output(i).tensor().set_layout(ov.Layout("NHWC"))
    return ppp.build()


class OpenVinoFormat(ExportFormat):
    name = "openvino"
    suffix = ".xml"
    runtime_name = "openvino"
    precisions = ("fp32", "fp16", "int8")

    def missing(self) -> str | None:
        return missing_modules("openvino", "onnx", "onnxscript")

    def export(self, request: ExportRequest, info: ArtifactInfo) -> Path:
        import openvino as ov

        output = request.output
        data = request.fp32_onnx()
        with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.stem}.") as tmp:
            onnx_path = Path(tmp) / "network.onnx"
            onnx_path.write_bytes(data)
            model = ov.convert_model(onnx_path)
            if request.precision == "int8":
                keep = output_producers(list(model.outputs), _output_conv)
                model = nncf_quantize(model, calibration_inputs(request, info), keep)
            model.set_rt_info(info.to_json(), METADATA_KEY)
            staged = Path(tmp) / output.name
            ov.save_model(model, str(staged), compress_to_fp16=request.precision == "fp16")
            # The .bin first, then the .xml that points at it: a reader never finds an .xml without its weights.
            os.replace(staged.with_suffix(".bin"), output.with_suffix(".bin"))
            os.replace(staged, output)
        return output

    def load(self, path: Path) -> Runtime:
        return OpenVinoRuntime(path)


def _output_conv(output: object) -> str:
    """The friendly name of the convolution that writes a graph output (through its bias ``Add``)."""
    node = output.get_node().input_value(0).get_node()  # type: ignore[attr-defined]
    while node.get_type_name() != "Convolution" and node.get_input_size() > 0:
        node = node.input_value(0).get_node()
    return node.get_friendly_name()


FORMATS.register(OpenVinoFormat.name)(OpenVinoFormat())
