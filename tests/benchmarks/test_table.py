"""benchmarks/table.py: each table's rows for one or two small models, checked against the models themselves."""
from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import densekit
from benchmarks import table
from densekit.cli.errors import UsageError
from densekit.utils import count_macs, count_parameters

ROOT = Path(__file__).resolve().parents[2]


def table_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("table", overrides=list(overrides)).table


def cells(line: str) -> list[str]:
    assert line.startswith("| ") and line.endswith(" |"), line
    return line[2:-2].split(" | ")


def test_models_table_row_is_the_models_counts() -> None:
    pytest.importorskip("effdet")
    lines = list(table.table_lines(table_cfg("table.models=[efficientdet_lite0]")))
    assert len(lines) == 3 and cells(lines[0])[:3] == ["model", "params densekit", "params effdet"]
    with torch.device("meta"):
        model = densekit.create_model("efficientdet_lite0")
    row = cells(lines[2])
    assert row[0] == "efficientdet_lite0"
    assert row[1] == row[2] == f"{count_parameters(model):,}" == "3,243,470"  # densekit and effdet: the same model
    assert row[3] == "-" and row[6] == "-"  # the paper publishes no Lite numbers
    assert row[4] == row[5] == f"{count_macs(model, [320, 320]) / 1e9:.2f}B"
    assert row[7:] == ["320x320", "tf_efficientnet_lite0", "64 x 3", "P3-P7", "3", "sum"]


def test_models_table_defaults_to_every_efficientdet_and_gives_the_papers_numbers() -> None:
    assert table.TABLES["models"][0]() == densekit.list_models(arch="efficientdet")
    row = cells(list(table.model_rows(["efficientdet_d0"]))[2])
    assert row[3] == "3.9M" and row[6] == "2.54B"


def test_segmentation_rows_with_latency_timed_through_time_interleaved(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    original = table.time_interleaved

    def recording(fns: dict, warmup: int, iters: int, sync: Callable[[], None]) -> dict:
        calls.append((warmup, iters))
        return original(fns, warmup, iters, sync)

    monkeypatch.setattr(table, "time_interleaved", recording)
    rows = ["lraspp_mobilenet_v3_small", "lraspp_mobilenet_v3_small (RF2)"]
    quoted = ",".join(f'"{r}"' for r in rows)
    cfg = table_cfg("table=segmentation", f"table.models=[{quoted}]", "table.size=[64,128]", "table.warmup=1",
                    "table.iters=2")
    lines = list(table.table_lines(cfg))
    assert lines[0].startswith("<!-- ") and lines[0].endswith("warm-up 1, 2 timed runs -->")
    assert "MACs 64x128" in lines[1] and len(lines) == 5
    assert calls == [(1, 2), (1, 2)]  # one timed model per row, the configured warm-up and calls
    for row, line in zip(rows, lines[3:]):
        got = cells(line)
        model = table.build_row_model(row, "cpu")
        assert got[0] == row and got[5] == f"{count_parameters(model):,}"
        assert got[6] == f"{count_macs(model, (64, 128)) / 1e9:.2f}B"
        median, best = (float(c.replace(",", "")) for c in got[7:9])
        assert 0 <= best <= median
    assert cells(lines[4])[1] == "mobilenet_v3_small (reduced tail)" and cells(lines[4])[5] == "515,614"
    assert cells(lines[4])[9] == "68.38 val / 69.4 test mIoU; 2.90B MACs"


def test_segmentation_counts_only_and_the_default_rows() -> None:
    lines = list(table.table_lines(table_cfg("table=segmentation", "table.models=[eseg_lite_s]", "table.iters=0")))
    row = cells(lines[3])
    assert row[:5] == ["eseg_lite_s", "efficientnet_es", "BiFPN P3-P9, 64 x 3", "ESeg 64 x 2", "relu"]
    assert row[7:] == ["-", "-", "76.0 mIoU at 189 FPS"]
    assert table.segmentation_models()[-2:] == list(table.VARIANTS)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["table.models=[nope]"], "unknown model(s) nope; known: efficientdet_"),
        (["table=segmentation", "table.models=[efficientdet_d0]"], "unknown model(s) efficientdet_d0"),
        (["table=segmentation", "table.size=[1,2,3]"], "table.size: image_size must be an int or [H, W]"),
        (["table=benchmarks", "table.precision=fp8"], "choose one of fp32, fp16, bf16"),
    ],
)
def test_refuses_clearly(overrides: list[str], message: str) -> None:
    with pytest.raises(UsageError) as exc:
        list(table.table_lines(table_cfg(*overrides)))
    assert message in str(exc.value)


def test_benchmarks_row_is_one_benchmark_run(run_script: Callable[..., subprocess.CompletedProcess]) -> None:
    done = run_script("table.py", "table=benchmarks", "table.models=[efficientdet_lite0]", "table.iters=1",
                      "table.warmup=0")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "| model | input | params | MACs | network ms | end-to-end ms | end-to-end FPS | mode | command |"
    row = cells(lines[2])
    params = count_parameters(densekit.create_model("efficientdet_lite0"))
    assert row[:4] == ["efficientdet_lite0", "320x320", f"{params:,}", "973.59M"]
    assert all(float(c.replace(",", "")) > 0 for c in row[4:7]) and row[7] == "eager"
    cmd = shlex.split(row[8].strip("`"))
    assert cmd == table.benchmark_command("efficientdet_lite0", table_cfg("table=benchmarks", "table.iters=1", "table.warmup=0"))
    assert cmd[:2] == ["python", "benchmarks/benchmark.py"] and "bench.fold_bn=true" in cmd


def test_a_failed_benchmark_run_is_a_row_that_says_why(run_script: Callable[..., subprocess.CompletedProcess]) -> None:
    done = run_script("table.py", "table=benchmarks", "table.models=[efficientdet_lite0]", "table.device=tpu",
                      timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    row = cells(done.stdout.splitlines()[2])
    assert row[:7] == ["efficientdet_lite0"] + ["-"] * 6
    assert row[7] == "failed: bench.device='tpu' is not a device; use auto, cpu, cuda, cuda:N or mps"
