"""densekit.deploy.formats: every CPU format exports a tiny detector and segmenter that load and run like the PyTorch
model (raw outputs, detections, label maps, larger batches than the artifact's); int8 and fp16 artifacts stay close
and keep the output layers in float; a bad artifact is an ArtifactError naming the file; artifacts work wherever
weights= does (model_spec, Predictor). TensorRT runs where CUDA and tensorrt are (skipped otherwise).
tools/export.py and tools/eval.py on artifacts: tests/tools/test_export_tool.py.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data as photos

import densekit
from densekit.deploy.formats import FORMATS, ArtifactError, export_artifact, load_artifact_model
from densekit.deploy.formats.artifact import compare_outputs
from densekit.modeling.model_spec import model_spec

SIZE = 64  # detector input (square)
TINY = {"neck": {"repeats": 1, "channels": 16}, "head": {"repeats": 1}}
NAMES = ["circle", "square", "triangle", "cross", "ring"]  # the synthetic shapes, as tools/eval.py's data has them
SEGMENTERS = {"onnx": ("lraspp_mobilenet_v3_small", (64, 96)), "openvino": ("eseg_lite_s", (64, 128))}
DET_BATCH = {"onnx": 1, "openvino": 2}  # openvino's artifact runs 3 images in chunks of 2, the last one padded
RTOL = 1e-4  # fp32: largest difference / largest output magnitude


def needs(fmt: str) -> None:
    reason = FORMATS.get(fmt).missing()
    if reason:
        pytest.skip(f"{fmt}: {reason}")


def images(n: int, size: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def detector(randomise) -> torch.nn.Module:
    """A tiny random 5-class D0 (random BN statistics too: outputs O(1), scores spread)."""
    torch.manual_seed(0)
    model = densekit.create_model("efficientdet_d0", num_classes=5, class_names=NAMES, **TINY).eval()
    randomise(model, seed=3)
    return model


@pytest.fixture(scope="module")
def segmenters(randomise) -> dict[str, torch.nn.Module]:
    models = {}
    for name, _ in SEGMENTERS.values():
        torch.manual_seed(0)
        models[name] = densekit.create_model(name, num_classes=4).eval()
        randomise(models[name], seed=5)
    return models


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def det_artifact(folder: Path, detector):
    """``det_artifact(fmt)``: the tiny detector as an fp32 ``fmt`` artifact at SIZE, batch DET_BATCH[fmt] (exported
    once per module)."""
    made: dict[str, Path] = {}

    def get(fmt: str) -> Path:
        needs(fmt)
        if fmt not in made:
            made[fmt] = export_artifact(detector, fmt, folder / f"d0{FORMATS.get(fmt).suffix}", (SIZE, SIZE),
                                        batch=DET_BATCH[fmt])
        return made[fmt]

    return get


@pytest.fixture(scope="module")
def checkpoint(folder: Path, detector) -> Path:
    """A training-style checkpoint of the detector that records its class count and names."""
    path = folder / "last.pth"
    torch.save({"model": detector.state_dict(), "config": {"model": {"num_classes": 5, "class_names": NAMES}}}, path)
    return path


# --- fp32 parity ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_detector_artifact_runs_like_the_pytorch_model(fmt: str, detector, det_artifact) -> None:
    """Raw outputs to float rounding and the same eval-mode detections, on 3 images: 3 runs of a batch-1 onnx
    artifact, 2 of a batch-2 openvino one (the second padded with a blank image whose outputs are dropped)."""
    loaded = load_artifact_model(det_artifact(fmt))
    info = loaded.artifact.info
    assert (info.format, info.precision, info.batch, info.image_size) == (fmt, "fp32", DET_BATCH[fmt], (SIZE, SIZE))
    assert not loaded.training and loaded.config.class_names == NAMES and loaded.config.neck.channels == 16

    batch = images(3, (SIZE, SIZE))
    gap = compare_outputs(detector, loaded, batch)
    assert gap["scale"] > 1.0 and gap["max_abs"] <= RTOL * gap["scale"], gap

    with torch.inference_mode():
        want, got = detector(batch), loaded(batch)
    assert len(got) == 3
    for ref, out in zip(want, got):
        assert len(ref["scores"]) > 0 and len(out["scores"]) == len(ref["scores"])
        torch.testing.assert_close(out["boxes"], ref["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(out["scores"], ref["scores"], atol=1e-5, rtol=0)
        assert torch.equal(out["labels"], ref["labels"])


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_segmenter_artifact_gives_the_pytorch_label_maps(fmt: str, segmenters, folder: Path) -> None:
    needs(fmt)
    name, size = SEGMENTERS[fmt]
    model = segmenters[name]
    path = export_artifact(model, fmt, folder / f"{name}{FORMATS.get(fmt).suffix}", size)
    loaded = load_artifact_model(path)
    assert loaded.config.name == name and loaded.config.num_classes == 4

    batch = images(2, size)
    gap = compare_outputs(model, loaded, batch)
    assert gap["max_abs"] <= RTOL * gap["scale"], gap
    with torch.inference_mode():
        want, got = model(batch), loaded(batch)
    for ref, out in zip(want, got):
        assert out["sem_seg"].shape == size and len(ref["sem_seg"].unique()) > 1
        assert torch.equal(out["sem_seg"], ref["sem_seg"])


# --- int8 and fp16 -------------------------------------------------------------------------------------------------


def _ov_quantized(value) -> bool:
    """Whether an OpenVINO node input is fed by int8: a FakeQuantize, or int8 weights through their dequantisation."""
    node = value.get_node()
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return True
    if kind == "Constant":
        return node.get_element_type().get_type_name() in ("i8", "u8", "i4", "u4")
    if kind in ("Convert", "Multiply", "Subtract", "Reshape", "Transpose"):
        return any(_ov_quantized(node.input_value(i)) for i in range(node.get_input_size()))
    return False


def _openvino_convs(path: Path) -> tuple[list[list[bool]], list[list[bool]]]:
    """For the convolutions writing the outputs and for all others: whether each input (data, weights) is int8."""
    import openvino as ov

    model = ov.Core().read_model(str(path))
    writers = []
    for out in model.outputs:
        node = out.get_node().input_value(0).get_node()
        while node.get_type_name() != "Convolution":
            node = node.input_value(0).get_node()
        writers.append(node)
    names = {n.get_friendly_name() for n in writers}
    others = [op for op in model.get_ops()
              if op.get_type_name() == "Convolution" and op.get_friendly_name() not in names]

    def flags(node):
        return [_ov_quantized(node.input_value(i)) for i in range(2)]

    return [flags(n) for n in writers], [flags(n) for n in others]


def _onnx_convs(path: Path) -> tuple[list[list[bool]], list[list[bool]]]:
    """The same for a QDQ ONNX graph: int8 inputs come out of DequantizeLinear."""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    writers = []
    for out in graph.output:
        node = producer[out.name]
        while node.op_type != "Conv":
            node = producer[node.input[0]]
        writers.append(node)
    names = {n.name for n in writers}
    others = [n for n in graph.node if n.op_type == "Conv" and n.name not in names]

    def flags(node):
        return [name in producer and producer[name].op_type == "DequantizeLinear" for name in node.input[:2]]

    return [flags(n) for n in writers], [flags(n) for n in others]


def _weights_bytes(path: Path) -> int:
    return (path.with_suffix(".bin") if path.suffix == ".xml" else path).stat().st_size


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def int8_detector(randomise) -> torch.nn.Module:
    """A detector whose NNCF calibration is quick: NNCF's time grows with the graph (a bias-correction pass per
    layer), so the tiny D0 head and neck on P3-P5 only, over timm's 10-layer ResNet."""
    torch.manual_seed(0)
    model = densekit.create_model("efficientdet_d0", num_classes=5, backbone={"name": "resnet10t"},
                                  neck={"repeats": 1, "channels": 16, "max_level": 5}, head={"repeats": 1}).eval()
    randomise(model, seed=3)
    return model


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_int8_quantises_all_but_the_output_layers_and_stays_close(fmt: str, int8_detector, tmp_path) -> None:
    """NNCF int8 on 4 calibration images: int8 weights (under 2 bytes a parameter) and quantised convolutions
    everywhere but in the layers that write the class logits and box regressions; outputs close to PyTorch's."""
    needs(fmt)
    model = int8_detector
    path = export_artifact(model, fmt, tmp_path / f"int8{FORMATS.get(fmt).suffix}", (SIZE, SIZE), precision="int8",
                           calibration=images(4, (SIZE, SIZE), seed=7), calibration_images=4)
    writers, others = (_openvino_convs if fmt == "openvino" else _onnx_convs)(path)
    assert len(writers) == 6 and all(flags == [False, False] for flags in writers), writers  # float in, float weights
    assert sum(flags == [True, True] for flags in others) > len(others) // 2, others
    assert _weights_bytes(path) < 2 * _parameters(model)

    loaded = load_artifact_model(path)
    assert loaded.artifact.info.precision == "int8" and loaded.artifact.info.extra == {"calibration_images": 4}
    gap = compare_outputs(model, loaded, images(2, (SIZE, SIZE)))
    assert 0 < gap["mean_rel"] < 0.15, gap  # quantised: not identical, but close on average
    with torch.inference_mode():
        assert all(len(d["scores"]) > 0 for d in loaded(images(2, (SIZE, SIZE))))


def test_openvino_fp16_halves_the_weights_and_stays_close(segmenters, tmp_path) -> None:
    needs("openvino")
    model = segmenters["lraspp_mobilenet_v3_small"]
    path = export_artifact(model, "openvino", tmp_path / "fp16.xml", (64, 96), precision="fp16")
    assert _weights_bytes(path) < 2.5 * _parameters(model)  # fp32 weights would take 4 bytes each
    loaded = load_artifact_model(path)
    assert loaded.artifact.info.precision == "fp16"
    batch = images(2, (64, 96))
    gap = compare_outputs(model, loaded, batch)
    assert gap["mean_rel"] < 0.03, gap  # fp16 weights; the CPU plugin may compute in bf16 (3 significant digits)
    with torch.inference_mode():
        agree = [(a["sem_seg"] == b["sem_seg"]).float().mean() for a, b in zip(model(batch), loaded(batch))]
    assert min(agree) > 0.95, agree


# --- artifacts that cannot be run: one ArtifactError (a ValueError) naming the file -----------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _copy_artifact(source: Path, target: Path) -> Path:
    shutil.copy(source, target)
    if source.suffix == ".xml":
        shutil.copy(source.with_suffix(".bin"), target.with_suffix(".bin"))
    return target


@pytest.mark.parametrize(
    ("fmt", "damage", "message"),
    [
        ("onnx", lambda p: _truncate(p), r"cannot load .*bad\.onnx in onnxruntime .*is the file complete\?"),
        ("onnx", lambda p: p.write_bytes(b""), r"cannot load .*bad\.onnx in onnxruntime"),
        ("openvino", lambda p: _truncate(p), r"cannot read .*bad\.xml with OpenVINO"),
        ("openvino", lambda p: _truncate(p.with_suffix(".bin")), r"cannot read .*bad\.xml with OpenVINO"),
        ("openvino", lambda p: p.with_suffix(".bin").unlink(), r"bad\.xml: its weights file bad\.bin is missing"),
    ],
    ids=["truncated-onnx", "empty-onnx", "truncated-xml", "truncated-bin", "missing-bin"],
)
def test_damaged_artifacts_are_refused_naming_the_file(fmt, damage, message, det_artifact, tmp_path) -> None:
    path = _copy_artifact(det_artifact(fmt), tmp_path / f"bad{FORMATS.get(fmt).suffix}")
    damage(path)
    with pytest.raises(ArtifactError, match=message) as err:
        load_artifact_model(path)
    assert str(path) in str(err.value) and isinstance(err.value, ValueError)


def test_onnx_without_densekit_metadata_is_refused(segmenters, tmp_path) -> None:
    from densekit.deploy.onnx import export_onnx

    needs("onnx")
    path = export_onnx(segmenters["lraspp_mobilenet_v3_small"], tmp_path / "plain.onnx", (64, 64))
    with pytest.raises(ArtifactError, match=re.escape(f"{path} is an ONNX file without densekit metadata")):
        load_artifact_model(path)


def test_wrong_input_size_names_the_exported_size(det_artifact) -> None:
    path = det_artifact("onnx")
    loaded = load_artifact_model(path)
    with pytest.raises(ArtifactError, match=re.escape(f"{path} was exported for 64x64 inputs, got 96x128")) as err:
        loaded(images(1, (96, 128)))
    assert "image_size=64" in str(err.value)


def test_artifact_of_another_model_is_refused_naming_both(det_artifact) -> None:
    path = det_artifact("onnx")
    other = densekit.load_model_config("eseg_lite_s")
    with pytest.raises(ArtifactError, match=re.escape(f"{path} is an artifact of efficientdet_d0")) as err:
        model_spec(other, path)
    assert "not eseg_lite_s" in str(err.value) and "pass model=efficientdet_d0" in str(err.value)
    with pytest.raises(ValueError, match="is an artifact of efficientdet_d0"):
        densekit.Predictor("efficientdet_lite0", weights=path)


def test_unknown_suffix_and_missing_file_are_named(tmp_path) -> None:
    weird = tmp_path / "model.tflite"
    weird.write_bytes(b"\0" * 16)
    with pytest.raises(ArtifactError, match=re.escape(f"{weird}: not an exported artifact; expected one of .onnx")):
        load_artifact_model(weird)
    for missing in (tmp_path / "nowhere.onnx", tmp_path / "nowhere.xml"):
        with pytest.raises(ArtifactError, match=re.escape(f"artifact not found: {missing}")):
            load_artifact_model(missing)


def test_export_refuses_what_a_format_cannot_write(segmenters, tmp_path) -> None:
    """Unsupported precision, a suffix of another format, a missing folder, int8 without calibration images: refused
    before anything is written."""
    model = segmenters["lraspp_mobilenet_v3_small"]
    with pytest.raises(ArtifactError, match=r"export.format=onnx writes precisions fp32, int8, not 'fp16'"):
        export_artifact(model, "onnx", tmp_path / "m.onnx", (64, 64), precision="fp16")
    with pytest.raises(ArtifactError, match=re.escape(f"export.output={tmp_path / 'm.onnx'}: an artifact of export.format=openvino is a "
                                                      ".xml file (e.g. m.xml)")):
        export_artifact(model, "openvino", tmp_path / "m.onnx", (64, 64))
    with pytest.raises(ArtifactError, match=re.escape(f"output directory {tmp_path / 'no'} does not exist")):
        export_artifact(model, "onnx", tmp_path / "no" / "m.onnx", (64, 64))
    with pytest.raises(ValueError, match="tflite"):
        export_artifact(model, "tflite", tmp_path / "m.tflite", (64, 64))
    needs("onnx")
    with pytest.raises(ArtifactError, match="export.precision=int8 needs calibration images"):
        export_artifact(model, "onnx", tmp_path / "m.onnx", (64, 64), precision="int8")
    assert list(tmp_path.iterdir()) == []


# --- artifacts wherever weights= goes -------------------------------------------------------------------------------


def test_predictor_on_artifacts_equals_the_checkpoint_predictor(det_artifact, checkpoint: Path) -> None:
    """``Predictor("x.onnx")`` and ``Predictor(name, weights="x.xml")`` (no config overrides: the artifact carries
    them, and its input size) find the checkpoint's boxes on a photo, in the photo's pixels, with its class names."""
    photo = np.ascontiguousarray(cv2.resize(photos.astronaut(), (160, 120), interpolation=cv2.INTER_AREA))
    reference = densekit.Predictor("efficientdet_d0", weights=checkpoint, image_size=SIZE, score_threshold=0.2, **TINY)
    want = reference(photo)
    assert len(want) > 0 and (want.height, want.width) == (120, 160)
    for predictor in (densekit.Predictor(det_artifact("onnx"), score_threshold=0.2),
                      densekit.Predictor("efficientdet_d0", weights=det_artifact("openvino"), score_threshold=0.2)):
        got = predictor(photo)
        assert predictor.class_names == NAMES and (got.height, got.width) == (120, 160)
        assert len(got) == len(want)
        np.testing.assert_allclose(got.boxes, want.boxes, rtol=1e-4, atol=1e-2)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
        assert got.names == want.names


def test_predictor_backend_converts_a_checkpoint_once(checkpoint: Path, segmenters) -> None:
    """``Predictor(..., backend="openvino")`` runs the checkpoint in OpenVINO with the same boxes as PyTorch; a
    segmenter at full resolution (no fixed size) is refused with what to pass."""
    photo = np.ascontiguousarray(cv2.resize(photos.astronaut(), (160, 120), interpolation=cv2.INTER_AREA))
    kwargs = dict(weights=checkpoint, image_size=SIZE, score_threshold=0.2, **TINY)
    want = densekit.Predictor("efficientdet_d0", **kwargs)(photo)
    converted = densekit.Predictor("efficientdet_d0", backend="openvino", **kwargs)
    assert converted.model.artifact.info.format == "openvino"
    got = converted(photo)
    assert len(got) == len(want) > 0
    np.testing.assert_allclose(got.boxes, want.boxes, rtol=1e-4, atol=1e-2)
    with pytest.raises(ValueError, match=r"pass image_size=\[H, W\]"):
        densekit.Predictor(segmenters["lraspp_mobilenet_v3_small"], backend="openvino")


# --- TensorRT ------------------------------------------------------------------------------------------------------

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def test_tensorrt_says_why_it_cannot_run_here(tmp_path) -> None:
    reason = FORMATS.get("tensorrt").missing()
    if HAS_TENSORRT:
        assert reason is None
        return
    assert reason and ("tensorrt not installed" in reason or "needs a CUDA GPU" in reason)
    engine = tmp_path / "d0.engine"  # an engine copied to a machine that cannot run it
    engine.write_bytes(b"\0" * 64)
    with pytest.raises(ArtifactError, match=re.escape(f"cannot run {engine}: {reason}")):
        load_artifact_model(engine)


@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT needs CUDA and the tensorrt package")
def test_tensorrt_fp16_engine_matches_pytorch(detector, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch-2 fp16 engine on 3 images (chunked and padded on the GPU) within fp16 tolerance of PyTorch in true
    fp32 (tests/gpu/test_cuda_tensorrt.py has the batch-1 case); detections come back on the GPU."""
    import copy

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = copy.deepcopy(detector).cuda()
    path = export_artifact(model, "tensorrt", tmp_path / "d0.engine", (SIZE, SIZE), precision="fp16", batch=2)
    assert path.is_file() and (tmp_path / "d0.engine.json").is_file()
    loaded = load_artifact_model(path).cuda()
    batch = images(3, (SIZE, SIZE)).cuda()
    gap = compare_outputs(model, loaded, batch)
    assert gap["mean_rel"] < 1e-2 and gap["max_abs"] < 5e-2 * gap["scale"], gap
    with torch.inference_mode():
        got = loaded(batch)
    assert len(got) == 3 and all(len(d["scores"]) > 0 and d["boxes"].is_cuda for d in got)
