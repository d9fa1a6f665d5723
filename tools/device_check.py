"""The one prepared GPU check: install what is missing, run tests/gpu, then the paper benchmarks; one JSON + one log.

Run through ``bash tools/device_check.sh`` (which picks the interpreter). Steps, in order of what matters most,
each in its own process with its own timeout, inside one overall budget (the whole check ends within 8 minutes;
a step that fails or runs out of time is recorded and the next one runs):

1. ``install``: the Python modules densekit, its tools and tests import; the missing ones from carried wheels
   (``.whl/`` or ``$DENSEKIT_WHEELS``; made beforehand by ``--fetch-wheels`` on a machine with PyPI) into a
   private folder on ``PYTHONPATH``, else pip from the network;
2. ``environment``: GPU, driver, CUDA / cuDNN / torch / torchvision / timm versions;
3. ``tests_gpu``: ``pytest tests/gpu`` with ``DENSEKIT_TEST_DEVICE=cuda`` (a skip counts as a failure, unless
   it says an optional runtime is missing: TensorRT, which step 5 reports);
4. ``benchmarks/benchmark.py`` (``bench.optimize`` default: BN folded, channels_last, compiled with CUDA graphs,
   cudnn.benchmark; fp16): D0 512 batch 1 and 8, ESeg-Lite-S and LR-ASPP-Large at 1024x2048, D7x 1536 (eager:
   compiling it takes minutes), and D0 batch 1 eager, to show what compiling brings; after the first two,
5. ``tensorrt`` (``tools/device_check_tensorrt.py``): D0 and ESeg-Lite-S as TensorRT fp16 engines against PyTorch.

``--dry-run`` (or ``DRY_RUN=1``) runs the same steps on the CPU at tiny sizes (tests/gpu with
``DENSEKIT_TEST_DEVICE=cpu``; 128 px inputs, one timed call, random weights, fp32, no compile; onnxruntime
for TensorRT), so that the script is known to work before it meets a GPU. The JSON is rewritten after every step,
so a killed run still leaves one; the log is written as the steps print.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import device_check_tensorrt as tensorrt_step  # tools/, this script's folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's densekit (for its JSON writer), installed or not
DEFAULT_BUDGET_S = 450  # the steps' share of the 8 minutes; installing and starting take the rest
MIN_STEP_S = 15  # a step is not started with less than this left

#: import name -> distribution, for what densekit, tools/, benchmarks/ and tests/ import beyond torch.
MODULES: dict[str, str] = {
    "torchvision": "torchvision", "timm": "timm", "numpy": "numpy", "cv2": "opencv-python-headless",
    "hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime", "yaml": "PyYAML",
    "pycocotools": "pycocotools", "albumentations": "albumentations", "albucore": "albucore",
    "pydantic": "pydantic", "pydantic_core": "pydantic-core", "annotated_types": "annotated-types",
    "typing_inspection": "typing-inspection", "simsimd": "simsimd", "stringzilla": "stringzilla",
    "scipy": "scipy", "cityscapesscripts": "cityscapesScripts", "pyquaternion": "pyquaternion",
    "coloredlogs": "coloredlogs", "humanfriendly": "humanfriendly", "appdirs": "appdirs", "tqdm": "tqdm",
    "tensorboard": "tensorboard", "skimage": "scikit-image", "pytest": "pytest", "effdet": "effdet",
}
#: distributions that are never carried: the device image's own builds (CUDA wheels, large native libraries).
NOT_CARRIED = {"torchvision", "numpy", "opencv-python-headless", "PyYAML", "scipy", "tensorboard", "scikit-image",
               "pytest", "timm", "tqdm"}
#: paper and NVIDIA figures the full run is held to: (step, mode, minimum FPS, source)
TARGETS = [
    ("bench_d0_b1", "network", 440.0, "NVIDIA TensorRT FP16 sample: D0 2.27 ms"),
    ("bench_d0_b1", "end_to_end", 250.0, "issue 12 target (paper: 97 FPS on a V100)"),
    ("bench_eseg_lite_s", "network", 189.0, "ESeg paper: ESeg-Lite-S 189 FPS at 1024x2048"),
    ("tensorrt", "efficientdet_d0/network", 440.0, "NVIDIA TensorRT FP16 sample: D0 2.27 ms"),
]
OPTIONAL_SKIP = "optional runtime missing"  # in tests/gpu's skip reason: a skip that does not fail tests_gpu
OUTCOMES = ("passed", "failure", "error", "skipped")


@dataclass(frozen=True)
class Bench:
    """One benchmarks/benchmark.py run of the full check; :meth:`overrides` gives its dry-run form too."""

    name: str
    model: str
    size: tuple[int, int]
    batch: int
    timeout_s: int
    warmup: int = 10
    iters: int = 100
    compile: bool | None = None  # None: bench.optimize's choice for the device

    def overrides(self, dry_run: bool, output: Path) -> list[str]:
        if dry_run:  # tiny, on the CPU, one timed call, fp32, eager: seconds each
            h, w = (128, 128) if self.size[0] == self.size[1] else (128, 256)
            size, batch, device = [h, w], min(self.batch, 2), "cpu"
            run = ["bench.warmup=1", "bench.iters=1", "bench.precision=fp32", "bench.compile=false",
                   "bench.matmul_peak=false"]
        else:
            size, batch, device = list(self.size), self.batch, "cuda"
            run = [f"bench.warmup={self.warmup}", f"bench.iters={self.iters}", "bench.precision=fp16"]
            run += [] if self.compile is None else [f"bench.compile={str(self.compile).lower()}"]
        return [f"model={self.model}", f"image_size=[{size[0]},{size[1]}]", f"bench.batch_size={batch}",
                f"bench.device={device}", *run, f"bench.output={output}"]


BENCHES = [
    Bench("bench_d0_b1", "efficientdet_d0", (512, 512), 1, 110, warmup=20, iters=200),
    Bench("bench_eseg_lite_s", "eseg_lite_s", (1024, 2048), 1, 100),
    Bench("bench_d0_b8", "efficientdet_d0", (512, 512), 8, 90, iters=50),
    Bench("bench_lraspp_large", "lraspp_mobilenet_v3_large", (1024, 2048), 1, 80),
    Bench("bench_d7x_b1", "efficientdet_d7x", (1536, 1536), 1, 70, warmup=5, iters=20, compile=False),
    Bench("bench_d0_b1_eager", "efficientdet_d0", (512, 512), 1, 45, warmup=20, iters=200, compile=False),
]


class Check:
    """The run's state: its JSON report (rewritten after every step), its log, its environment and its deadline."""

    def __init__(self, out_dir: Path, dry_run: bool, budget_s: float) -> None:
        self.out_dir = out_dir
        self.dry_run = dry_run
        self.deadline = time.monotonic() + budget_s
        self.work = Path(tempfile.mkdtemp(prefix="densekit-device-check-"))
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "DENSEKIT_DATASETS": str(self.work / "datasets"),
                    "DENSEKIT_TEST_DEVICE": "cpu" if dry_run else "cuda",
                    # this checkout's densekit, installed or not (on the device it is a bare copy)
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if dry_run:  # a small, shared CPU: one thread a process, and idle threads that sleep instead of spinning
            self.env = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", **self.env}
        # The log, written as the steps print: open for the whole run, so a killed run still leaves it.
        self.log: TextIO = open(out_dir / "device_check.log", "a", buffering=1)  # noqa: SIM115
        self.report: dict[str, Any] = {
            "dry_run": dry_run, "started": now(), "finished": None, "budget_s": budget_s, "steps": [], "targets": [],
        }

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")

    def run(self, name: str, cmd: list[str], cap_s: float) -> dict[str, Any]:
        """Run ``cmd`` under ``min(cap_s, time left)``; its step record (not yet saved), with the output's tail.

        The output goes to a file of its own, then into the log, so the step can read what its command printed.
        """
        left = self.deadline - time.monotonic()
        step: dict[str, Any] = {"name": name, "command": cmd, "status": "skipped", "seconds": 0.0}
        if left < MIN_STEP_S:
            step["reason"] = f"out of time: {left:.0f} s of the budget left"
            return step
        timeout = min(cap_s, left)
        self.say(f"\n=== {name} (timeout {timeout:.0f} s): {' '.join(cmd)}")
        start = time.monotonic()
        output = self.work / f"{name}.out"
        with open(output, "w") as sink:  # the child's output, not a result file
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own group: a timeout ends its children too
            try:
                step["returncode"] = proc.wait(timeout=timeout)
                step["status"] = "ok" if step["returncode"] == 0 else "failed"
            except subprocess.TimeoutExpired:
                step.update(status="timeout", reason=f"killed after {timeout:.0f} s")
            finally:  # also when this driver is stopped: a child in its own session would outlive it
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        text = output.read_text(errors="replace")
        self.log.write(text)
        step["output_tail"] = text[-3000:]
        step["seconds"] = round(time.monotonic() - start, 1)
        self.say(f"=== {name}: {step['status']} in {step['seconds']} s")
        return step

    def record(self, step: dict[str, Any]) -> None:
        self.report["steps"].append(step)
        self.save()

    def save(self) -> None:
        path = self.out_dir / "device_check.json"
        try:
            from densekit.utils.files import atomic_save_json
        except ImportError:  # densekit itself does not import here: the report must still say so
            path.write_text(json.dumps(self.report, indent=2, default=str))
            return
        atomic_save_json(self.report, path)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def missing_modules(python: str, env: dict[str, str]) -> list[str]:
    """The import names of :data:`MODULES` that ``python`` cannot import (checked without importing them)."""
    probe = ("import importlib.util, json, sys; "
             "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]))")
    done = subprocess.run([python, "-c", probe, *MODULES], env=env, capture_output=True, text=True, timeout=60)
    return json.loads(done.stdout) if done.returncode == 0 else list(MODULES)


def install(check: Check) -> None:
    """Make the missing modules importable: carried wheels first, pip from the network second."""
    step: dict[str, Any] = {"name": "install", "status": "ok", "python": sys.executable}
    start = time.monotonic()
    missing = missing_modules(sys.executable, check.env)
    step["missing_before"] = missing
    dists = sorted({MODULES[m] for m in missing} - NOT_CARRIED)
    site = check.work / "site"
    wheels = Path(os.environ.get("DENSEKIT_WHEELS", ROOT / ".whl"))
    if dists:
        norm = {d.lower().replace("-", "_") for d in dists}
        found = [w for w in sorted(wheels.glob("*.whl")) if w.name.split("-")[0].lower() in norm]
        step["wheels"] = [w.name for w in found]
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site)]
        cmd = pip + ["--no-index", *map(str, found)] if found else pip + dists
        done = check.run("install", cmd, 150)
        step.update({k: done[k] for k in ("command", "returncode", "output_tail") if k in done})
        check.env["PYTHONPATH"] = os.pathsep.join([str(site), check.env["PYTHONPATH"]])
        sys.path.insert(0, str(site))
    step["missing_after"] = missing_modules(sys.executable, check.env)
    # effdet is only the benchmarks' optional reference: missing, the check still runs.
    if set(step["missing_after"]) - {"effdet"}:
        step["status"] = "failed"
        step["reason"] = f"cannot import {', '.join(step['missing_after'])}; carry wheels (--fetch-wheels) or go online"
    step["seconds"] = round(time.monotonic() - start, 1)
    check.say(f"=== install: {step['status']}; missing before {missing}, after {step['missing_after']}")
    check.record(step)


ENV_PROBE = r"""
import json, platform, importlib.metadata as md, torch
from densekit.benchmarks.timing import cpu_name
cuda = torch.cuda.is_available()
props = torch.cuda.get_device_properties(0) if cuda else None
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
print("ENV_JSON " + json.dumps({
    "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if cuda else None, "cuda_available": cuda,
    "gpu": props.name if cuda else None, "gpu_count": torch.cuda.device_count(),
    "gpu_memory_gib": round(props.total_memory / 2**30, 1) if cuda else None,
    "compute_capability": f"{props.major}.{props.minor}" if cuda else None,
    "cpu": cpu_name(), "cpu_threads": torch.get_num_threads(),
    "packages": {n: version(n) for n in ("torchvision", "timm", "triton", "numpy", "hydra-core", "effdet")},
}))
"""


def environment(check: Check) -> None:
    """GPU, driver and library versions, read in a child process (the driver itself never initialises CUDA)."""
    step = check.run("environment", [sys.executable, "-c", ENV_PROBE], 60)
    line = next((ln for ln in step.get("output_tail", "").splitlines() if ln.startswith("ENV_JSON ")), None)
    if line is not None:
        step["info"] = json.loads(line[len("ENV_JSON "):])
        if not check.dry_run and not step["info"]["cuda_available"]:
            step.update(status="failed", reason="torch.cuda.is_available() is False: no GPU for the check")
    elif step["status"] == "ok":
        step.update(status="failed", reason="the probe printed no ENV_JSON line")
    smi = None
    if _has("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        smi = subprocess.run(query, capture_output=True, text=True, timeout=30)
    step["nvidia_smi"] = smi.stdout.strip() if smi is not None and smi.returncode == 0 else None
    check.record(step)


def _has(program: str) -> bool:
    return any((Path(d) / program).is_file() for d in os.environ.get("PATH", "").split(os.pathsep))


def tests_gpu(check: Check) -> None:
    """pytest tests/gpu; ok only if something ran and nothing failed, errored or skipped (but for OPTIONAL_SKIP)."""
    junit = check.work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu", f"--junitxml={junit}"]
    step = check.run("tests_gpu", cmd, 150)  # on the GPU too: the TensorRT test builds an engine (tens of s)
    if junit.exists():
        cases = ET.parse(junit).getroot().iter("testcase")
        results = {}
        for case in cases:
            found = next((c for c in case if c.tag in OUTCOMES[1:]), None)  # TensorRT missing: skipped_optional
            optional = found is not None and found.tag == "skipped" and OPTIONAL_SKIP in found.get("message", "")
            results[f"{case.get('classname')}::{case.get('name')}"] = (
                "passed" if found is None else "skipped_optional" if optional else found.tag)
        step["tests"] = results
        step["counts"] = {o: list(results.values()).count(o) for o in (*OUTCOMES, "skipped_optional")}
        if step["status"] == "ok" and (step["counts"]["passed"] == 0 or step["counts"]["skipped"]):
            step.update(status="failed", reason="tests/gpu skipped tests or ran none: they did not run on the device")
    check.record(step)


def benchmark(check: Check, bench: Bench) -> None:
    """One benchmarks/benchmark.py run in its own process; its whole result (every figure) goes into the step."""
    output = check.work / f"{bench.name}.json"
    cmd = [sys.executable, "benchmarks/benchmark.py", *bench.overrides(check.dry_run, output)]
    check.record(bench_step(check.run(bench.name, cmd, bench.timeout_s), output))


def benchmarks_in_one_process(check: Check, benches: list[Bench]) -> dict[str, Any]:
    """Dry-run benchmarks: the same overrides, run by one worker process (:func:`bench_worker`), because on a
    2-core machine importing torch, torchvision and Hydra costs 5-10 s a process; one step record per benchmark.
    The worker then runs the TensorRT step's plan, if any (:mod:`device_check_tensorrt`); returns its record."""
    specs = {b.name: b.overrides(True, check.work / f"{b.name}.json") for b in benches}
    (check.work / "benches.json").write_text(json.dumps(specs))  # the worker's input, not a result
    cap = sum(b.timeout_s for b in benches)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bench-worker", str(check.work)]
    worker = check.run("benchmarks", cmd, cap)
    for bench in benches:
        done = check.work / f"{bench.name}.done.json"
        status = json.loads(done.read_text()) if done.exists() else {"status": worker["status"], "seconds": 0.0}
        step = {"name": bench.name, "command": ["benchmarks/benchmark.py", *specs[bench.name]], **status}
        if status["status"] != "ok":
            step.setdefault("output_tail", worker.get("output_tail", ""))
        check.record(bench_step(step, check.work / f"{bench.name}.json"))
    return worker


def bench_step(step: dict[str, Any], output: Path) -> dict[str, Any]:
    """``step`` with the benchmark's result file read in: every figure, and the FPS summary the targets use."""
    if output.exists():
        result = json.loads(output.read_text())
        step["result"] = result
        step["summary"] = {
            mode: {"median_ms": s["median_ms"], "fps": 1000.0 * result["batch_size"] / s["median_ms"]}
            for mode, s in result["results"]["densekit"].items()
        }
        step["summary"]["compiled"] = result.get("densekit_compiled")
    elif step["status"] == "ok":
        step.update(status="failed", reason=f"no result file {output}")
    return step


def bench_worker(work: Path) -> int:
    """Run every benchmark of ``work/benches.json`` ({name: overrides}) in this process, in order; each writes its
    result file and ``<name>.done.json`` ({status, seconds, reason}). A failing one does not stop the others."""
    from hydra import compose, initialize_config_dir

    from densekit.benchmarks import benchmark
    from densekit.benchmarks.results import save_result
    from densekit.utils.files import atomic_save_json

    for name, overrides in json.loads((work / "benches.json").read_text()).items():
        start, done = time.monotonic(), {"status": "ok"}
        try:
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
                cfg = compose("benchmark", overrides=overrides)
            result = benchmark.run(cfg)
            print(f"=== {name}\n{benchmark.report(result)}", flush=True)
            save_result(result, cfg.bench.output)
        except (Exception, SystemExit) as err:  # noqa: BLE001 - recorded as the step's failure; the next one runs
            done = {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
            print(f"=== {name} FAILED: {done['reason']}", flush=True)
        atomic_save_json({**done, "seconds": round(time.monotonic() - start, 1)}, work / f"{name}.done.json")
    return tensorrt_step.run_plan(work) if (work / tensorrt_step.PLAN).exists() else 0


def judge_targets(check: Check) -> None:
    """Each target against its step's median FPS (``met`` is None in a dry run or without a figure)."""
    steps = {s["name"]: s for s in check.report["steps"]}
    for name, mode, minimum, source in TARGETS:
        fps = steps.get(name, {}).get("summary", {}).get(mode, {}).get("fps")
        met = None if check.dry_run or fps is None else fps >= minimum
        check.report["targets"].append({"step": name, "mode": mode, "min_fps": minimum, "fps": fps, "met": met,
                                        "source": source})


def fetch_wheels(folder: Path, python_version: str = "3.12") -> int:
    """Download, here (PyPI reachable), the wheels the device lacks, for its Python (3.12) on x86-64 Linux, at this
    environment's versions; a pure-Python package published only as source is built into a wheel."""
    import importlib.metadata as md

    folder.mkdir(parents=True, exist_ok=True)
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28, 34)] + ["--platform=manylinux2014_x86_64"]
    failed = []
    for dist in sorted(set(MODULES.values()) - NOT_CARRIED):
        try:
            spec = f"{dist}=={md.version(dist)}"
        except md.PackageNotFoundError:
            spec = dist
        pip = [sys.executable, "-m", "pip", "-q"]
        download = pip + ["download", "--no-deps", "--only-binary=:all:", f"--python-version={python_version}",
                          "--implementation=cp", *platforms, "-d", str(folder), spec]
        if subprocess.run(download).returncode != 0 and subprocess.run(
            pip + ["wheel", "--no-deps", "-w", str(folder), spec]
        ).returncode != 0:
            failed.append(spec)
    size = sum(w.stat().st_size for w in folder.glob("*.whl")) / 2**20
    count = len(list(folder.glob("*.whl")))
    print(f"{count} wheels, {size:.1f} MiB in {folder}" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


class Stopped(Exception):
    """The driver got SIGTERM."""


def stopped(signum: int, frame: object) -> None:
    raise Stopped


def run_steps(check: Check, dry_run: bool) -> None:
    install(check)
    environment(check)
    tests_gpu(check)
    # The dry run times its first benchmark as the GPU run does (a process of its own), the others in one process.
    for bench in BENCHES[:1] if dry_run else BENCHES:
        benchmark(check, bench)
        if bench.name == "bench_eseg_lite_s":  # the TensorRT step, in its own process, after the target benchmarks
            tensorrt_step.run_step(check)
    if dry_run:  # the TensorRT step's CPU stand-in runs in the benchmarks' worker process, after them
        tensorrt_step.run_step(check, lambda: benchmarks_in_one_process(check, BENCHES[1:]))
    judge_targets(check)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN", "") not in ("", "0"),
                        help="the same steps on the CPU at tiny sizes (also DRY_RUN=1)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "device_check_out"),
                        help="folder for device_check.json and .log (default $OUT, else ./device_check_out)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for all steps together")
    parser.add_argument("--fetch-wheels", type=Path, metavar="DIR", help="only download the device's wheels into DIR")
    parser.add_argument("--wheel-python", default="3.12", help="with --fetch-wheels: the target Python version")
    parser.add_argument("--bench-worker", type=Path, metavar="DIR", help=argparse.SUPPRESS)  # see bench_worker
    args = parser.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels, args.wheel_python)
    if args.bench_worker:
        return bench_worker(args.bench_worker)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.dry_run, args.budget_s)
    check.say(f"densekit device check{' (dry run, CPU)' if args.dry_run else ''}: {args.out}")
    signal.signal(signal.SIGTERM, stopped)  # device_check.sh's overall timeout: end the step's processes, then save
    try:
        run_steps(check, args.dry_run)
    except Stopped:
        check.report["stopped"] = "SIGTERM (the overall timeout): the steps after the last recorded one did not run"
    check.report["finished"] = now()
    check.save()
    shutil.rmtree(check.work, ignore_errors=True)  # datasets, result files and outputs: all in the report now
    bad = [s["name"] for s in check.report["steps"] if s["status"] != "ok"]
    stop = f"; {check.report['stopped']}" if "stopped" in check.report else ""
    check.say(f"\nsteps not ok: {', '.join(bad) or 'none'}{stop}; report {args.out / 'device_check.json'}")
    return 1 if bad or "stopped" in check.report else 0


if __name__ == "__main__":
    sys.exit(main())
