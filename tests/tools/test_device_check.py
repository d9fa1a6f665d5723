"""tools/device_check.sh --dry-run: the GPU check's every step, on the CPU at tiny sizes, as CI can run it; so the
script is known to work before it meets a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["install", "environment", "tests_gpu", "bench_d0_b1", "bench_eseg_lite_s", "bench_d0_b8",
         "bench_lraspp_large", "bench_d7x_b1", "bench_d0_b1_eager"]


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
    assert counts["passed"] >= 14 and counts["failure"] == counts["error"] == counts["skipped"] == 0
    for name in STEPS[3:]:
        result, summary = steps[name]["result"], steps[name]["summary"]
        assert result["device"] == "cpu" and result["iters"] == 1
        assert summary["network"]["fps"] > 0 and summary["end_to_end"]["fps"] > 0
    assert steps["bench_d0_b8"]["result"]["batch_size"] == 2
    assert steps["bench_eseg_lite_s"]["result"]["image_size"] == [128, 256]
    # Every target is listed with its figure, and none is judged on the CPU.
    assert [(t["step"], t["mode"]) for t in report["targets"]] == [
        ("bench_d0_b1", "network"), ("bench_d0_b1", "end_to_end"), ("bench_eseg_lite_s", "network")]
    assert all(t["fps"] > 0 and t["met"] is None for t in report["targets"])
    assert "=== tests_gpu: ok" in (out / "device_check.log").read_text()
