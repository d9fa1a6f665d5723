"""tools/device_check.sh --dry-run: the GPU check's every step, on the CPU at tiny sizes, as CI can run it; so the
script is known to work before it meets a GPU. The TensorRT step's decisions where it cannot run are checked on
their own (no process, no torch)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHES = ["bench_d0_b1", "bench_eseg_lite_s", "bench_d0_b8", "bench_lraspp_large", "bench_d7x_b1",
           "bench_d0_b1_eager"]
# On the GPU the tensorrt step runs after bench_eseg_lite_s; the dry run's stand-in runs in the benchmarks' worker.
STEPS = ["install", "environment", "tests_gpu", *BENCHES, "tensorrt"]


# About a minute of CPU: `make test-all` runs it. tools/device_check.sh itself ran on an H200 on 2026-12-04 (every
# step ok but TensorRT, not installed there; docs/benchmarks.md "GPU"); CI keeps the suite under 10 minutes.
@pytest.mark.slow
def test_dry_run_passes_every_step_and_writes_one_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "DENSEKIT_DATASETS": str(tmp_path / "datasets")}
    env.pop("DENSEKIT_TEST_DEVICE", None)  # the dry run sets it for its own tests/gpu step
    done = subprocess.run(["bash", "tools/device_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["device_check.json", "device_check.log"]
    report = json.loads((out / "device_check.json").read_text())
    assert report["dry_run"] and report["finished"]
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEPS
    assert {name: s["status"] for name, s in steps.items()} == dict.fromkeys(STEPS, "ok")
    assert steps["environment"]["info"]["torch"] and steps["environment"]["info"]["python"]
    counts = steps["tests_gpu"]["counts"]
    assert counts["passed"] >= 15 and counts["failure"] == counts["error"] == counts["skipped"] == 0
    assert counts["skipped_optional"] == 0  # onnxruntime stands in for TensorRT in tests/gpu on the CPU
    assert any("test_cuda_tensorrt" in name for name in steps["tests_gpu"]["tests"])
    for name in BENCHES:
        result, summary = steps[name]["result"], steps[name]["summary"]
        assert result["device"] == "cpu" and result["iters"] == 1
        assert summary["network"]["fps"] > 0 and summary["end_to_end"]["fps"] > 0
    assert steps["bench_d0_b8"]["result"]["batch_size"] == 2
    assert steps["bench_eseg_lite_s"]["result"]["image_size"] == [128, 256]
    check_tensorrt_stand_in(steps["tensorrt"])
    # Every target is listed with its figure, and none is judged on the CPU.
    assert [(t["step"], t["mode"]) for t in report["targets"]] == [
        ("bench_d0_b1", "network"), ("bench_d0_b1", "end_to_end"), ("bench_eseg_lite_s", "network"),
        ("tensorrt", "efficientdet_d0/network")]
    assert all(t["fps"] > 0 and t["met"] is None for t in report["targets"])
    assert "=== tests_gpu: ok" in (out / "device_check.log").read_text()


def check_tensorrt_stand_in(step: dict) -> None:
    """The dry run's TensorRT step: the same code with onnxruntime in TensorRT's place, saying so, both models
    exported, equal to PyTorch (fp32), timed beside it and scored beside it on the synthetic val splits."""
    assert step["format"] in ("onnx", "openvino") and step["substitute_for"] == "tensorrt"
    assert "dry run" in step["why"] and step["ran_in"] == "benchmarks"
    assert list(step["models"]) == ["efficientdet_d0", "eseg_lite_s"]
    for name, metric in (("efficientdet_d0", "AP"), ("eseg_lite_s", "mIoU")):
        model = step["models"][name]
        assert model["status"] == "ok" and model["format"] == step["format"]
        assert model["parity"]["mean_rel"] < (1e-5 if model["precision"] == "fp32" else 1e-2)
        timing = model["timing"]["results"]
        assert timing["pytorch"]["network"]["fps"] > 0 and timing[step["format"]]["end_to_end"]["fps"] > 0
        accuracy = model["accuracy"]
        assert accuracy["metric"] == metric and accuracy["split"] == "val" and accuracy["images"] == 4
        assert accuracy["difference"] == pytest.approx(accuracy[step["format"]] - accuracy["pytorch"])
        assert 0.0 <= accuracy["pytorch"] <= 1.0
        assert step["summary"][f"{name}/network"]["fps"] > 0
    assert step["models"]["eseg_lite_s"]["image_size"] == [64, 128]  # through data.eval_size, as on the GPU


def tensorrt_step_module():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import device_check_tensorrt
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return device_check_tensorrt


@pytest.mark.parametrize("cuda, tensorrt, reason", [
    (False, True, "no CUDA device"), (True, False, "tensorrt is not installed"), (True, True, None)])
def test_tensorrt_step_on_the_gpu_is_skipped_where_it_cannot_run(
    cuda: bool, tensorrt: bool, reason: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No CUDA, or no tensorrt module: a skipped record saying why and how to install it, and no plan (no process
    is started); with both: the plan for the two engines at their real sizes, fp16."""
    module = tensorrt_step_module()
    found = module._importable
    monkeypatch.setattr(module, "_importable", lambda *names: tensorrt if names == ("tensorrt",) else found(*names))
    info = {"cuda_available": cuda, "cuda": "13.0" if cuda else None}
    check = SimpleNamespace(work=tmp_path, dry_run=False, report={"steps": [{"name": "environment", "info": info}]})
    skipped = module.plan(check)
    plan_file = tmp_path / module.PLAN
    if reason is None:
        assert skipped is None
        spec = json.loads(plan_file.read_text())
        assert (spec["format"], spec["precision"], spec["device"], spec["substitute_for"]) == (
            "tensorrt", "fp16", "cuda", None)
        assert [(j["name"], j["size"]) for j in spec["jobs"]] == [
            ("efficientdet_d0", [512, 512]), ("eseg_lite_s", [1024, 2048])]
        return
    assert skipped["name"] == "tensorrt" and skipped["status"] == "skipped" and reason in skipped["reason"]
    assert not plan_file.exists()


def test_tensorrt_step_keeps_the_models_a_timed_out_worker_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step's process killed by its timeout after the first model: that model's result and FPS are kept, the
    second is failed for want of a result, and the step is a timeout, with the process's output."""
    module = tensorrt_step_module()
    monkeypatch.setattr(module, "_importable", lambda *names: True)
    check = SimpleNamespace(work=tmp_path, dry_run=False, report={"steps": [
        {"name": "environment", "info": {"cuda_available": True, "cuda": "13.0"}}]})
    assert module.plan(check) is None
    timing = {"results": {"tensorrt": {"network": {"median_ms": 2.0}}, "pytorch": {"network": {"median_ms": 5.0}}}}
    (tmp_path / "tensorrt_efficientdet_d0.json").write_text(json.dumps({"status": "ok", "timing": timing}))
    worker = {"name": "tensorrt", "status": "timeout", "seconds": 210.0, "reason": "killed after 210 s",
              "output_tail": "building eseg_lite_s"}
    step = module.collect(check, worker)
    assert step["status"] == "timeout" and step["output_tail"] == "building eseg_lite_s"
    assert step["models"]["efficientdet_d0"]["status"] == "ok"
    assert step["models"]["eseg_lite_s"]["status"] == "failed"
    assert step["summary"] == {"efficientdet_d0/network": {"median_ms": 2.0, "fps": 500.0}}
