"""benchmarks/benchmark.py: both references (effdet, torchvision), the deployment backends (onnxruntime, OpenVINO,
TensorRT), the JSON it writes, and its behaviour on bad input.

Timings are never asserted (a shared 2-core machine); the tests check what is timed, what is reported, and that
failures say why. Tiny settings: 1-2 timed calls, small inputs.
"""
from __future__ import annotations

import importlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from densekit.benchmarks.results import save_result

pytest.importorskip("effdet")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_benchmark(run_script: Callable[..., subprocess.CompletedProcess]) -> Callable[..., subprocess.CompletedProcess]:
    """``run_benchmark(*overrides)``: benchmarks/benchmark.py with those overrides."""
    return lambda *overrides: run_script("benchmark.py", *overrides)


def check_rows(result: dict, impls: tuple[str, ...]) -> None:
    assert tuple(result["results"]) == impls
    for impl in impls:
        for mode in ("network", "end_to_end"):
            stats = result["results"][impl][mode]
            for key in ("mean_ms", "median_ms", "p90_ms", "fps"):
                assert stats[key] > 0, (impl, mode, key)
            assert len(stats["times_ms"]) == result["iters"]
        assert result["results"][impl]["network"]["gflops"] > 0
    for impl in impls[1:]:
        for mode in ("network", "end_to_end"):
            ratio = result["ratios"][impl][mode]["median_ms"]
            expected = result["results"]["densekit"][mode]["median_ms"] / result["results"][impl][mode]["median_ms"]
            assert ratio == pytest.approx(expected)


def test_compares_with_effdet_and_writes_json(tmp_path: Path, run_benchmark: Callable[..., subprocess.CompletedProcess]) -> None:
    output = tmp_path / "bench.json"
    proc = run_benchmark(
        "model=efficientdet_lite0", "bench.iters=2", "bench.warmup=1", "bench.compare=true", "bench.fold_bn=true",
        "bench.channels_last=true", "bench.compile=false", f"bench.output={output}",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(output.read_text())
    assert result["model"] == "efficientdet_lite0" and result["image_size"] == [320, 320]
    assert result["reference"] == {"implementation": "effdet", "model": "tf_efficientdet_lite0"}
    assert result["params"] == 3_243_470 and result["macs_per_image"] > 0
    assert result["fold_bn"] and result["channels_last"] and not result["densekit_compiled"]
    assert result["matmul_peak_gflops"] > 0
    check_rows(result, ("densekit", "effdet"))
    for text in ("BN folded, channels_last", "vs effdet tf_efficientdet_lite0", "% of the matmul peak", "overhead"):
        assert text in proc.stdout


def test_lraspp_compares_with_torchvision(tmp_path: Path, run_benchmark: Callable[..., subprocess.CompletedProcess]) -> None:
    output = tmp_path / "bench.json"
    proc = run_benchmark(
        "model=lraspp_mobilenet_v3_large", "image_size=[128,256]", "bench.iters=1", "bench.warmup=0",
        "bench.compare=true", "bench.matmul_peak=false", "bench.optimize=false", f"bench.output={output}",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(output.read_text())
    assert result["reference"] == {"implementation": "torchvision", "model": "lraspp_mobilenet_v3_large"}
    # bench.optimize=false: the model as built
    assert not (result["optimize"] or result["fold_bn"] or result["channels_last"] or result["compile"])
    assert "as built (eager)  (bench.optimize=false)" in proc.stdout
    assert "matmul_peak_gflops" not in result
    check_rows(result, ("densekit", "torchvision"))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["bench.device=tpu"], "is not a device"),
        (["bench.precision=fp8"], "choose one of fp32, fp16, bf16"),
        (["model.name=mine"], "no reference implementation"),
        (["model=lraspp_mobilenet_v3_small"], "no reference implementation"),
        (["model=efficientdet_d0", "model.neck.channels=32"], "not the same model"),
        (["bench.backends=[torch,tflite]"], "'tflite' unknown: backends are torch, onnxruntime, openvino, tensorrt"),
    ],
)
def test_refuses_clearly(overrides: list[str], message: str, run_benchmark: Callable[..., subprocess.CompletedProcess]) -> None:
    proc = run_benchmark("bench.compare=true", "bench.iters=1", *overrides)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_failed_compile_is_reported_and_eager_times_still_come_out(monkeypatch: pytest.MonkeyPatch) -> None:
    tool = importlib.import_module("densekit.benchmarks.benchmark")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no C++ compiler on this machine")

    monkeypatch.setattr(torch, "compile", broken)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("benchmark", overrides=[
            "model=efficientdet_lite0", "image_size=128", "bench.iters=1", "bench.warmup=0", "bench.compare=true",
            "bench.compile=true", "bench.matmul_peak=false",
        ])
    result = tool.run(cfg)
    assert result["compile"] and not result["densekit_compiled"]
    assert tuple(result["results"]) == ("densekit", "effdet")  # no effdet+compile rows, the eager ones remain
    notes = " | ".join(result["notes"])
    assert "torch.compile failed (RuntimeError: no C++ compiler" in notes
    assert "effdet could not be compiled (RuntimeError: no C++ compiler" in notes
    assert "compile FAILED" in tool.report(result)


@pytest.mark.slow  # compiles two whole detectors: minutes on 2 cores
def test_compile_times_the_reference_eager_and_compiled(tmp_path: Path, run_benchmark: Callable[..., subprocess.CompletedProcess]) -> None:
    """bench.compile=true: densekit compiled, and effdet timed both eager and compiled (inductor freezing) in the
    same run, with a ratio against each."""
    output = tmp_path / "bench.json"
    proc = run_benchmark(
        "model=efficientdet_lite0", "image_size=128", "bench.iters=1", "bench.warmup=1", "bench.compare=true",
        "bench.compile=true", "bench.fold_bn=true", "bench.channels_last=true", "bench.matmul_peak=false",
        f"bench.output={output}",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(output.read_text())
    assert result["densekit_compiled"] and result["notes"] == []
    check_rows(result, ("densekit", "effdet", "effdet+compile"))
    assert "torch.compile (inductor freezing)" in proc.stdout and "densekit / effdet+compile" in proc.stdout


def bench_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("benchmark", overrides=list(overrides)).bench


@pytest.mark.parametrize(
    "device,overrides,expected",
    [
        ("cpu", [], {"fold_bn": True, "channels_last": True, "compile": True, "compile_mode": None,
                     "cudnn_benchmark": False}),
        ("cuda", [], {"fold_bn": True, "channels_last": True, "compile": True, "compile_mode": "reduce-overhead",
                      "cudnn_benchmark": True}),
        ("cuda", ["bench.compile=false", "bench.compile_mode=max-autotune"],
         {"fold_bn": True, "compile": False, "compile_mode": "max-autotune"}),
        ("cuda", ["bench.optimize=false"], {"fold_bn": False, "channels_last": False, "compile": False,
                                             "compile_mode": None, "cudnn_benchmark": False}),
        ("cpu", ["bench.optimize=false", "bench.fold_bn=true"], {"fold_bn": True, "channels_last": False}),
    ],
    ids=["cpu-default", "cuda-default", "explicit-wins", "as-built", "as-built-plus-one"],
)
def test_optimize_times_the_devices_fastest_configuration_unless_told(
    device: str, overrides: list[str], expected: dict
) -> None:
    """bench.optimize=true (default) fills every null option with the device's verified fastest setting; false
    leaves them off; an option given on the command line wins either way. (Resolution only: no device needed.)"""
    tool = importlib.import_module("densekit.benchmarks.benchmark")
    resolved = tool.resolve_options(bench_cfg(*overrides), torch.device(device))
    assert {key: resolved[key] for key in expected} == expected


def test_compile_mode_reaches_torch_compile_on_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.compile_mode is torch.compile's mode for densekit's compile targets and for the compiled reference
    (torch.compile recorded, not run: compiling takes minutes here)."""
    tool = importlib.import_module("densekit.benchmarks.benchmark")
    modes: list[object] = []

    def recording(fn: object, **kwargs: object) -> object:
        modes.append(kwargs.get("mode"))
        return fn

    monkeypatch.setattr(torch, "compile", recording)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("benchmark", overrides=[
            "model=efficientdet_lite0", "image_size=128", "bench.iters=1", "bench.warmup=0", "bench.compare=true",
            "bench.compile_mode=max-autotune", "bench.matmul_peak=false",
        ])
    result = tool.run(cfg)
    assert result["compile"] and result["densekit_compiled"] and result["compile_mode"] == "max-autotune"
    assert len(modes) == 2 and set(modes) == {"max-autotune"}  # densekit's network, effdet's network
    assert "torch.compile (inductor freezing, mode max-autotune)" in tool.report(result)
    assert tuple(result["results"]) == ("densekit", "effdet", "effdet+compile")


TINY_SEGMENTER = ["model=lraspp_mobilenet_v3_small", "image_size=[64,128]", "bench.iters=1", "bench.warmup=1",
                  "bench.compile=false", "bench.matmul_peak=false"]


def test_backends_time_the_same_model_in_each_runtime(tmp_path: Path) -> None:
    """bench.backends=[torch,onnxruntime,openvino]: the model exported to each runtime and timed in the same run as
    torch; every JSON row names its backend and precision, each artifact's parity against the PyTorch fp32 model is
    recorded, OpenVINO has its bare InferRequest row, and the backend ratios are the rows' medians divided."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    tool = importlib.import_module("densekit.benchmarks.benchmark")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("benchmark", overrides=[*TINY_SEGMENTER, "bench.backends=[torch,onnxruntime,openvino]"])
    result = json.loads(save_result(tool.run(cfg), tmp_path / "bench.json").read_text())
    rows = {(impl, mode): (s["backend"], s["precision"]) for impl, modes in result["results"].items()
            for mode, s in modes.items()}
    assert rows == {
        ("densekit", "network"): ("torch", "fp32"), ("densekit", "end_to_end"): ("torch", "fp32"),
        ("onnxruntime", "network"): ("onnxruntime", "fp32"), ("onnxruntime", "end_to_end"): ("onnxruntime", "fp32"),
        ("openvino", "network"): ("openvino", "fp32"), ("openvino", "end_to_end"): ("openvino", "fp32"),
        ("openvino bare", "network"): ("openvino", "fp32"),
    }
    for modes in result["results"].values():
        for s in modes.values():
            assert s["median_ms"] > 0 and len(s["times_ms"]) == 1
    backends = result["backends"]
    assert set(backends["rows"]) == {"onnxruntime", "openvino"} and backends["skipped"] == {}
    for row in backends["rows"].values():
        assert row["precision"] == "fp32" and row["artifact_mb"] > 0
        assert row["parity"]["mean_rel"] < 1e-5 and row["parity"]["max_abs"] <= 1e-4 * row["parity"]["scale"]
    assert result["ratios"] == {}  # densekit over references only: the backends have their own ratios
    median = {impl: {m: s["median_ms"] for m, s in modes.items()} for impl, modes in result["results"].items()}
    ratios = backends["ratios"]
    assert ratios["openvino end_to_end / openvino bare"] == pytest.approx(
        median["openvino"]["end_to_end"] / median["openvino bare"]["network"])
    assert ratios["onnxruntime network / torch network"] == pytest.approx(
        median["onnxruntime"]["network"] / median["densekit"]["network"])
    report = tool.report(result)
    for text in ("openvino bare", "parity: max abs", "openvino end_to_end / torch end_to_end"):
        assert text in report


def test_tensorrt_without_a_gpu_is_skipped_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for tensorrt on a machine without CUDA times the other rows and says in one line why TensorRT is not
    timed, instead of failing (CUDA hidden, so that this holds on a GPU machine too)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tool = importlib.import_module("densekit.benchmarks.benchmark")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("benchmark", overrides=[*TINY_SEGMENTER, "bench.warmup=0", "bench.backends=[torch,tensorrt]",
                                              "bench.backend_precision=[fp32,fp16]"])
    result = tool.run(cfg)
    assert tuple(result["results"]) == ("densekit",)
    reason = "TensorRT needs a CUDA GPU and this machine has none"
    assert list(result["backends"]["skipped"]) == ["tensorrt"] and reason in result["backends"]["skipped"]["tensorrt"]
    skipped_lines = [line for line in tool.report(result).splitlines() if "tensorrt" in line]
    assert len(skipped_lines) == 1 and skipped_lines[0].startswith(f"note: tensorrt skipped: {reason}")


def test_a_precision_a_format_does_not_write_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.backend_precision=[fp32,fp16]: OpenVINO writes both, an ONNX artifact has no fp16: that row is skipped
    with what the format writes. (The plan only: nothing is exported.)"""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    backends = importlib.import_module("densekit.benchmarks.backends")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan, skipped = backends.backend_plan(
        bench_cfg("bench.backends=[torch,onnxruntime,openvino]", "bench.backend_precision=[fp32,fp16]"),
        torch.device("cpu"))
    assert plan == [("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "fp16")]
    assert skipped == {"onnxruntime fp16": "the onnx format writes fp32, int8, not fp16"}


def test_each_runtime_is_primed_and_the_primers_are_not_reported() -> None:
    """The calls' order within an iteration: densekit, the references, then each backend's rows; with backends, each
    runtime's rows start after an untimed primer call of its network (a runtime's first call after another runtime's
    pays for the other's spinning threads), whose times are dropped. Without backends the order is as before."""
    tool = importlib.import_module("densekit.benchmarks.benchmark")
    backends = importlib.import_module("densekit.benchmarks.backends")

    def call() -> None:
        return None

    torch_rows = dict.fromkeys(["effdet/end_to_end", "densekit/end_to_end", "effdet/network", "densekit/network"], call)
    torch_order = ["densekit/network", "densekit/end_to_end", "effdet/network", "effdet/end_to_end"]
    assert list(tool.timing_order(torch_rows, {})) == torch_order
    backend_rows = dict.fromkeys(["openvino primer/network", "openvino/network", "openvino/end_to_end",
                                  "openvino bare/network"], call)
    order = list(tool.timing_order(torch_rows, backend_rows))
    assert order == ["densekit primer/network", *torch_order, *backend_rows]
    kept = backends.without_primers(dict.fromkeys(order, [0.01]))
    assert list(kept) == [*torch_order, "openvino/network", "openvino/end_to_end", "openvino bare/network"]
