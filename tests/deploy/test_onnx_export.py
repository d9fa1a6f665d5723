"""ONNX export: onnxruntime parity per architecture, detection post-processing in the graph, and tools/export.py
(default export.format=onnx; its parity check's export.atol is relative to the output scale)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import densekit  # noqa: E402
from densekit.deploy.onnx import ExportError, check_onnx, export_onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY_D0 = {"neck": {"repeats": 1}}


def spread_class_logits(model: nn.Module) -> nn.Module:
    """Give a fresh detector distinct class scores: at the prior bias every score is ~0.01, and near-ties would
    let onnxruntime and PyTorch order (and so NMS) candidates differently for reasons that are not the graph's."""
    with torch.no_grad():
        model.head.class_net.predict.conv_pw.bias.zero_()
        model.head.class_net.predict.conv_pw.weight.mul_(300)
    return model


@pytest.mark.parametrize(
    ("name", "overrides", "size", "outputs"),
    [
        ("efficientdet_d0", TINY_D0, (128, 128), [f"cls_p{i}" for i in range(3, 8)] + [f"box_p{i}" for i in range(3, 8)]),
        ("eseg_lite_s", {}, (64, 128), ["logits"]),
        ("lraspp_mobilenet_v3_small", {}, (64, 128), ["logits"]),
    ],
)
def test_network_parity(tmp_path: Path, name: str, overrides: dict, size: tuple[int, int], outputs: list[str]) -> None:
    torch.manual_seed(0)
    model = densekit.create_model(name, **overrides)
    path = export_onnx(model, tmp_path / f"{name}.onnx", size)
    assert path == tmp_path / f"{name}.onnx" and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp left
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert session.get_inputs()[0].shape == [1, 3, *size]
    assert [o.name for o in session.get_outputs()] == outputs
    assert check_onnx(model, path, size) <= 1e-4


def test_network_parity_dynamo_opset18_batch2(tmp_path: Path) -> None:
    """Opset >= 18 goes through the dynamo exporter; a baked-in batch of 2 and a size that needs padding."""
    torch.manual_seed(0)
    model = densekit.create_model("lraspp_mobilenet_v3_small")
    path = export_onnx(model, tmp_path / "m.onnx", (72, 100), batch=2, opset=18)
    assert ort.InferenceSession(str(path)).get_inputs()[0].shape == [2, 3, 72, 100]
    assert check_onnx(model, path, (72, 100)) <= 1e-4


@pytest.mark.parametrize("opset", [17, 18])
def test_detection_postprocess_matches_eval_forward(tmp_path: Path, opset: int) -> None:
    """The graph's NMS output equals the model's own eval-mode detections, padded to max_detections."""
    torch.manual_seed(0)
    model = spread_class_logits(
        densekit.create_model("efficientdet_d0", num_classes=3, postprocess={"score_threshold": 0.6}, **TINY_D0)
    ).eval()
    size = (128, 96)
    path = export_onnx(model, tmp_path / "nms.onnx", size, batch=2, opset=opset, postprocess=True)
    assert check_onnx(model, path, size) <= 1e-4

    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    boxes, scores, labels, counts = ort.InferenceSession(str(path)).run(None, {"images": images.numpy()})
    most = model.postprocessor.max_detections
    assert boxes.shape == (2, most, 4) and scores.shape == labels.shape == (2, most) and counts.shape == (2,)
    with torch.no_grad():
        reference = model(images)
    for b, ref in enumerate(reference):
        n = int(counts[b])
        assert n == len(ref["scores"]) and 0 < n < most  # the threshold leaves some, not all
        np.testing.assert_allclose(boxes[b, :n], ref["boxes"].numpy(), atol=1e-4)
        np.testing.assert_allclose(scores[b, :n], ref["scores"].numpy(), atol=1e-5)
        np.testing.assert_array_equal(labels[b, :n], ref["labels"].numpy())
        assert not boxes[b, n:].any() and not scores[b, n:].any()


def test_unsupported_exports_raise(tmp_path: Path) -> None:
    det = densekit.create_model("efficientdet_d0", postprocess={"soft_nms": True}, **TINY_D0)
    with pytest.raises(ExportError, match="soft-NMS"):
        export_onnx(det, tmp_path / "soft.onnx", (128, 128), postprocess=True)
    seg = densekit.create_model("lraspp_mobilenet_v3_small")
    with pytest.raises(ExportError, match="for detectors"):
        export_onnx(seg, tmp_path / "seg.onnx", (64, 64), postprocess=True)
    with pytest.raises(FileNotFoundError):
        export_onnx(seg, tmp_path / "missing" / "seg.onnx", (64, 64))
    assert not list(tmp_path.rglob("*.onnx")) and not list(tmp_path.rglob("*.tmp"))


def test_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is written through atomic_write: a failure at its last step leaves the old graph, no temp file."""
    model = densekit.create_model("lraspp_mobilenet_v3_small")
    path = export_onnx(model, tmp_path / "m.onnx", (64, 64))
    before = path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_onnx(model, path, (64, 96))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def _tool(*overrides: str) -> subprocess.Popen:
    """Start tools/export.py; ``.communicate()`` waits for it. Independent runs overlap: two cores, half the time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "tools" / "export.py"), *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _done(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_export_tool_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "lraspp.onnx"
    runs = [
        _tool("model=lraspp_mobilenet_v3_small", f"export.output={out}", "image_size=[64,128]"),
        _tool("model=lraspp_mobilenet_v3_small", "image_size=[64,128]"),
        _tool("model=lraspp_mobilenet_v3_small", f"export.output={tmp_path / 'nms.onnx'}", "export.postprocess=true"),
    ]
    done, missing, bad = (_done(proc) for proc in runs)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.is_file() and f"wrote {out}" in done.stdout and "as onnx fp32, input 1x3x64x128" in done.stdout
    assert "onnxruntime vs PyTorch: max abs difference" in done.stdout and "(outputs up to" in done.stdout

    assert missing.returncode == 2 and "error: export.output is required" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert bad.returncode == 2 and "error: postprocess=True is for detectors" in bad.stderr
    assert "Traceback" not in bad.stderr


def _export_tool():
    """The export tool's module, densekit.cli.export (its ``check`` is the parity step the tool runs after writing)."""
    from densekit.cli import export

    return export


def test_export_check_tolerance_is_relative_to_the_output_scale(tmp_path: Path) -> None:
    """export.atol scales with the largest output: logits of ~1e5 differ by float rounding far above an absolute
    1e-3 and pass; an artifact of other weights fails, naming the file (which is kept for inspection)."""
    from omegaconf import OmegaConf

    from densekit.deploy.formats import export_artifact

    tool = _export_tool()
    torch.manual_seed(0)
    model = densekit.create_model("lraspp_mobilenet_v3_small", num_classes=4).eval()
    with torch.no_grad():
        for name in model.output_layers():
            model.get_submodule(name).weight.mul_(1e7)
    path = export_artifact(model, "onnx", tmp_path / "big.onnx", (64, 64))
    e = OmegaConf.create({"batch": 1, "format": "onnx", "precision": "fp32", "atol": 1e-3})
    gap = tool.check(model, path, (64, 64), e)
    assert gap["scale"] > 1e4 and 1e-3 < gap["max_abs"] <= 1e-3 * gap["scale"], gap

    with torch.no_grad():
        model.get_submodule(model.output_layers()[0]).weight.mul_(1.1)  # no longer the exported weights
    with pytest.raises(ExportError, match=rf"{path}: onnxruntime differs from PyTorch by .* > export.atol 0.001 x"):
        tool.check(model, path, (64, 64), e)
    assert path.is_file()
