"""tools/export.py writes an artifact from a checkpoint and reports its parity; tools/eval.py scores that artifact as
it scores the checkpoint; export.format=tensorrt on a machine without CUDA / tensorrt is one error line.

The four tool runs are independent pairs: each pair runs at once (one thread each), which halves their wall time
on the two cores the suite has.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import densekit
from densekit.deploy.formats import FORMATS

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64
TINY = {"neck": {"repeats": 1, "channels": 16}, "head": {"repeats": 1}}
TINY_MODEL = ["model=efficientdet_d0", "model.neck.repeats=1", "model.neck.channels=16", "model.head.repeats=1"]
TINY_DATA = ["data.num_train=2", "data.num_val=6", f"data.image_size={SIZE}", "eval.num_workers=0", "eval.plots=false"]
NAMES = ["circle", "square", "triangle", "cross", "ring"]  # the synthetic shapes' categories, in id order


def start(tool: str, *overrides: str, log: Path, datasets: Path) -> tuple[subprocess.Popen, Path]:
    """Start ``tools/<tool>`` with its output in ``log`` (a file: a full pipe would block the other run)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DENSEKIT_DATASETS": str(datasets)}
    out = log.open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / tool), *overrides], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, text=True)
    out.close()
    return proc, log


def finish(*runs: tuple[subprocess.Popen, Path]) -> list[tuple[int, str]]:
    """Wait for ``runs``; (exit code, output) each."""
    results = []
    for proc, log in runs:
        try:
            code = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        results.append((code, log.read_text()))
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory, randomise) -> dict:
    """A tiny random 5-class D0 checkpoint; then at once ``tools/export.py`` (it -> openvino .xml, batch 2) and
    ``tools/eval.py`` on it; then at once ``tools/eval.py`` on the .xml and ``tools/export.py
    export.format=tensorrt``."""
    base = tmp_path_factory.mktemp("export_tool")
    datasets = base / "datasets"
    torch.manual_seed(0)
    model = densekit.create_model("efficientdet_d0", num_classes=5, **TINY).eval()
    randomise(model, seed=3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    randomise(model, seed=4)  # the EMA: what tools/eval.py scores and tools/export.py exports (ema=true defaults)
    ckpt = base / "last.pth"
    torch.save({"model": weights, "ema": {"module": model.state_dict()},
                "config": {"model": {"num_classes": 5, "class_names": NAMES}}}, ckpt)
    xml, engine = base / "d0.xml", base / "d0.engine"
    export, eval_ckpt = finish(
        start("export.py", *TINY_MODEL, f"weights={ckpt}", f"image_size={SIZE}", "export.format=openvino",
              "export.batch=2", f"export.output={xml}", log=base / "export.log", datasets=datasets),
        start("eval.py", *TINY_MODEL, *TINY_DATA, f"weights={ckpt}", f"hydra.run.dir={base / 'eval_ckpt'}",
              log=base / "eval_ckpt.log", datasets=datasets),
    )
    # The artifact carries its config: model= alone names it (no neck / head overrides, unlike the checkpoint).
    eval_xml, tensorrt = finish(
        start("eval.py", "model=efficientdet_d0", *TINY_DATA, f"weights={xml}", f"hydra.run.dir={base / 'eval_xml'}",
              log=base / "eval_xml.log", datasets=datasets),
        start("export.py", *TINY_MODEL, f"weights={ckpt}", f"image_size={SIZE}", "export.format=tensorrt",
              f"export.output={engine}", log=base / "tensorrt.log", datasets=datasets),
    )
    return {"base": base, "xml": xml, "engine": engine, "export": export, "eval_ckpt": eval_ckpt,
            "eval_xml": eval_xml, "tensorrt": tensorrt}


@pytest.mark.skipif(FORMATS.get("openvino").missing() is not None, reason="needs openvino")
def test_export_tool_writes_an_openvino_artifact_and_reports_its_parity(runs) -> None:
    code, out = runs["export"]
    assert code == 0, out[-3000:]
    xml = runs["xml"]
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    assert f"wrote {xml} (" in out and "efficientdet_d0 as openvino fp32, input 2x3x64x64, postprocess False" in out
    assert "openvino vs PyTorch: max abs difference" in out and "mean relative difference" in out
    assert not [p.name for p in xml.parent.iterdir() if p.name.startswith(".d0.")]  # no staging folder left


@pytest.mark.skipif(FORMATS.get("openvino").missing() is not None, reason="needs openvino")
def test_eval_scores_the_artifact_as_it_scores_the_checkpoint(runs) -> None:
    """Same AP, and the same detections written for COCO, from the .xml as from the checkpoint it came from (its EMA
    weights, which both tools take by default). A random model scores AP 0 on the shapes: the detections, compared
    box by box, are what tells a wrong artifact apart."""
    for name in ("eval_ckpt", "eval_xml"):
        code, out = runs[name]
        assert code == 0, f"{name}:\n{out[-3000:]}"
    assert "EMA weights of" in runs["eval_ckpt"][1]
    assert f"openvino fp32 artifact {runs['xml']}" in runs["eval_xml"][1]
    base = runs["base"]
    want = json.loads((base / "eval_ckpt" / "metrics.json").read_text())
    got = json.loads((base / "eval_xml" / "metrics.json").read_text())
    for key in ("AP", "AP50", "AP75"):
        assert got[key] == pytest.approx(want[key], abs=1e-4), key

    def rows(run: str) -> dict[int, np.ndarray]:
        found: dict[int, list] = {}
        for d in json.loads((base / run / "detections_val.json").read_text()):
            found.setdefault(d["image_id"], []).append([*d["bbox"], d["score"], d["category_id"]])
        return {k: np.array(sorted(v, key=lambda r: -r[4])) for k, v in found.items()}

    ref, art = rows("eval_ckpt"), rows("eval_xml")
    assert len(ref) == 6 and set(art) == set(ref)
    for image_id, expected in ref.items():
        assert len(art[image_id]) == len(expected)
        np.testing.assert_allclose(art[image_id], expected, rtol=1e-3, atol=1e-2)


@pytest.mark.skipif(FORMATS.get("tensorrt").missing() is None, reason="TensorRT runs here")
def test_tensorrt_export_without_cuda_is_one_error_line(runs) -> None:
    code, out = runs["tensorrt"]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, out[-3000:]
    assert errors[0].startswith("error: export.format=tensorrt is not available here: ")
    assert "tensorrt not installed" in errors[0] or "TensorRT needs a CUDA GPU" in errors[0]
    assert "Traceback" not in out and not runs["engine"].exists()
