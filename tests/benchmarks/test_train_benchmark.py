"""benchmarks/train_benchmark.py: densekit's and effdet's training steps timed side by side, and the loader."""
from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("effdet")


def test_train_benchmark_times_both_implementations(
    tmp_path: Path, run_script: Callable[..., subprocess.CompletedProcess]
) -> None:
    out = tmp_path / "train_bench.json"
    done = run_script(
        "train_benchmark.py", "model=efficientdet_lite0", "bench.image_size=128", "bench.batch_size=2", "bench.iters=1",
        "bench.warmup=1", "bench.loader_images=4", "bench.num_workers=[0]", "data.num_train=8", "data.num_val=2",
        "bench.jpeg_images=4",
        f"bench.output={out}", env={"DENSEKIT_DATASETS": str(tmp_path), "OMP_NUM_THREADS": "2"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["train_step"]) == {"densekit", "effdet", "densekit+cl", "effdet+cl"}  # both layouts, both sides
    assert all(s["median_ms"] > 0 for s in result["train_step"].values())
    assert result["loader_images_per_s"]["num_workers=0"] > 0
    assert set(result["decoder_images_per_s"]) == {"opencv", "torchvision", "pil"}
    assert all(v > 0 for v in result["decoder_images_per_s"].values())
    assert "640x480 JPEGs, decoder torchvision + train transform, one process" in done.stdout
    assert "densekit / effdet (median, both NCHW)" in done.stdout and "loader (num_workers=0, train transform)" in done.stdout
    assert "densekit+cl / effdet+cl (median, both channels_last)" in done.stdout


def test_train_benchmark_reports_the_peak_memory_of_checkpointed_and_bf16_steps(
    tmp_path: Path, run_script: Callable[..., subprocess.CompletedProcess]
) -> None:
    out = tmp_path / "train_bench.json"
    done = run_script(
        "train_benchmark.py", "model=efficientdet_lite0", "bench.image_size=128", "bench.batch_size=2", "bench.iters=1",
        "bench.warmup=0", "bench.compare=false", "bench.layouts=[nchw]", "bench.grad_checkpoint=true",
        "bench.bf16=true", "bench.peak_memory=true", "bench.loader_images=0", f"bench.output={out}", env={"OMP_NUM_THREADS": "2"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["train_step"]) == set(result["peak_step_mib"]) == {"densekit", "densekit+bf16", "densekit+ckpt"}
    assert result["loader_images_per_s"] == result["decoder_images_per_s"] == {}
    assert "densekit+ckpt  step raises peak memory by" in done.stdout


def test_train_benchmark_refuses_a_model_without_an_effdet_twin(
    tmp_path: Path, run_script: Callable[..., subprocess.CompletedProcess]
) -> None:
    done = run_script(
        "train_benchmark.py", "model=efficientdet_lite0", "model.neck.channels=32", "bench.image_size=128",
        env={"DENSEKIT_DATASETS": str(tmp_path)}, timeout=120,
    )
    assert done.returncode == 2
    assert "bench.compare=true: densekit's efficientdet_lite0 as configured has" in done.stderr
    assert "not the same model" in done.stderr and "Traceback" not in done.stderr


def test_compile_rows_compile_densekit_per_layout_and_effdet_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.compile=true: ``+compile`` rows only for bench.compile_layouts, densekit through compile_for_training (its
    network and loss) on a copy, effdet's whole bench; the compiled steps run and report their ratios. torch.compile
    is replaced by a recording identity here: inductor's minutes of compiling are what the benchmark itself measures."""
    import torch
    from hydra import compose, initialize_config_dir

    from benchmarks.train_benchmark import build_steps, report

    compiled: list[str] = []

    def fake_compile(fn, **options):
        compiled.append(type(getattr(fn, "__self__", fn)).__name__ + "." + getattr(fn, "__name__", "forward"))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    root = Path(__file__).resolve().parents[2]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base=None):
        cfg = compose("train_benchmark", overrides=[
            "model=efficientdet_d0", "bench.image_size=64",
            "bench.batch_size=2", "bench.compile=true", "bench.compile_layouts=[channels_last]"])
    fns, _ = build_steps(cfg)
    assert list(fns) == ["effdet", "densekit", "effdet+cl", "densekit+cl", "densekit+cl+compile", "effdet+cl+compile"]
    assert compiled == ["EfficientDet.network", "EfficientDet.training_losses", "DetBenchTrain.forward"]
    for step in fns.values():
        step()
    fake = {"median_ms": 1.0, "mean_ms": 1.0, "p90_ms": 1.0, "fps": 1.0}
    text = report({"model": "d0", "batch_size": 1, "image_size": 64, "device": "cpu", "torch": "x",
                   "train_step": {k: fake for k in fns}, "loader_images_per_s": {}})
    assert "densekit+cl+compile / effdet (median; compiled densekit vs effdet as it ships): 1.000" in text
    assert "densekit+cl+compile / effdet+cl+compile (median; both compiled): 1.000" in text
