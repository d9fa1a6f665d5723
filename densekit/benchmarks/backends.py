"""Deployment backends timed beside the PyTorch rows of ``densekit benchmark``: ``bench.backends``.

Usage::

    python benchmarks/benchmark.py model=efficientdet_lite0 bench.backends=[torch,onnxruntime,openvino]
    python benchmarks/benchmark.py model=efficientdet_d0 bench.backends=[torch,openvino] \
        bench.backend_precision=[fp32,int8]
    python benchmarks/benchmark.py model=efficientdet_d0 bench.device=cuda bench.backends=[torch,tensorrt] \
        bench.backend_precision=fp16

Every backend but ``torch`` runs the same model, with the same weights, as a :mod:`densekit.deploy.formats`
artifact: exported from the PyTorch model as built (fp32, before BN folding or compiling) at the benchmark's image
size and batch into a temporary folder, then loaded with :func:`~densekit.deploy.formats.load_artifact_model`, whose
pre- and post-processing is the PyTorch path's own code. Its rows, timed in the same interleaved call as the torch
rows (the ``densekit`` rows, which always run: every ratio is against them):

* ``network``: ``m.network(batch)``, the artifact alone (the input handed to the runtime, raw outputs back as
  tensors in the layout of the PyTorch model's ``network``);
* ``end_to_end``: ``m(images)``: the input checks, the artifact, then the same decoding / NMS or argmax as torch;
* OpenVINO only, ``<label> bare``: OpenVINO's own ``InferRequest.infer`` on the same input as a numpy array, what a
  user calling OpenVINO directly would time; ``end_to_end / bare`` is what densekit's wrapping costs.

The artifacts get the timed input as a contiguous (NCHW) tensor on their runtime's device, the layout a deployment
feeds them; the torch rows keep theirs (channels_last when optimised).

Each runtime's rows are preceded, in every iteration, by one call of its network whose time is dropped (a *primer*,
:func:`without_primers`). Without it a runtime's first row pays for the runtime that ran before it: PyTorch's
OpenMP threads spin-wait after each parallel region, and on a small CPU they take the cores from the next runtime's
first call. Measured on the 2-core development machine (Lite0 at 320, torch optimised eager, 40 interleaved calls
each, medians): OpenVINO's bare call took 18.3 ms right after a torch call and 14.1 ms right after its own (16.0 vs
15.5 ms with ``OMP_WAIT_POLICY=PASSIVE``, which halves torch's speed); torch's took 32.0 ms after OpenVINO's and
30.9 ms after its own. With the primers every timed row runs as in a deployment loop, right after its own runtime's
previous call.

``bench.backend_precision`` (one, or a list such as ``[fp32,int8]``: one set of rows each) is the artifacts'
precision; a backend whose format does not write it is skipped with the reason. int8 is calibrated on
:data:`CALIBRATION_IMAGES` random images of the input shape (seeded): enough to time the int8 kernels, not to judge
the int8 model's accuracy (``tools/eval.py`` on an int8 artifact calibrated on real images does that). The torch
rows keep ``bench.precision``.

Parity: :func:`~densekit.deploy.formats.artifact.compare_outputs` of each artifact against the PyTorch fp32 model it
was exported from, on the timed input. A backend that cannot run here (TensorRT without CUDA, a runtime not
installed) or fails to export is skipped with a one-line reason in the notes, and the other rows still come out.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from torch import nn

#: ``bench.backends`` names -> the :mod:`densekit.deploy.formats` format each runs (``torch``: the PyTorch rows).
BACKENDS: dict[str, str | None] = {"torch": None, "onnxruntime": "onnx", "openvino": "openvino", "tensorrt": "tensorrt"}
#: The results' name of the PyTorch rows, which every backend row is put against.
TORCH_ROWS = "densekit"
#: Random images an int8 artifact is calibrated on (as benchmarks/precisions.py does for torch's int8).
CALIBRATION_IMAGES = 8
#: Suffix of the row names of the primer calls (see the module docstring), whose times are dropped.
PRIMER = " primer"


def primer_key(label: str) -> str:
    """The timed-function key of the primer call of the runtime whose rows are named ``label``."""
    return f"{label}{PRIMER}/network"


def without_primers(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """``times`` without the primer calls' rows."""
    return {key: t for key, t in times.items() if not key.split("/")[0].endswith(PRIMER)}


def row_label(backend: str, precision: str) -> str:
    """The results' name of a backend's rows: the backend, with the precision unless fp32 (``openvino int8``)."""
    return backend if precision == "fp32" else f"{backend} {precision}"


@dataclass
class BackendRun:
    """One exported and loaded artifact: what its timed rows and its summary need."""

    backend: str
    precision: str
    model: nn.Module  # load_artifact_model's: the artifact inside densekit's own pre- and post-processing
    images: torch.Tensor  # the timed input on the runtime's device, contiguous NCHW
    export_s: float
    artifact_mb: float
    parity: dict[str, float]

    @property
    def label(self) -> str:
        return row_label(self.backend, self.precision)

    @property
    def bare_label(self) -> str | None:
        """The row of the runtime's own call without densekit around it (OpenVINO's InferRequest), or None."""
        return f"{self.label} bare" if self.backend == "openvino" else None


def _as_list(value: Any) -> list[str]:
    """A config value given as one name or a list of them, as a list of strings without repeats, in order."""
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    return list(dict.fromkeys(str(item) for item in items))


def backend_plan(b: DictConfig, device: torch.device) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The ``(backend, precision)`` pairs of ``bench.backends`` x ``bench.backend_precision`` that can run here,
    and why each other one is skipped (backend or row label -> reason). Exits naming a value that is no backend or
    precision.

    Checked before the model is built, so that a typo exits before anything is built, compiled or exported.
    """
    from densekit.cli.errors import UsageError
    from densekit.deploy.formats import FORMATS
    from densekit.deploy.formats.base import PRECISIONS

    names, precisions = _as_list(b.get("backends", ["torch"])), _as_list(b.get("backend_precision", "fp32"))
    unknown = [n for n in names if n not in BACKENDS] + [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise UsageError(f"bench.backends / bench.backend_precision: {', '.join(map(repr, unknown))} unknown: "
                         f"backends are {', '.join(BACKENDS)}; precisions {', '.join(PRECISIONS)}")
    plan: list[tuple[str, str]] = []
    skipped: dict[str, str] = {}
    for name in names:
        if BACKENDS[name] is None:
            continue
        fmt = FORMATS.get(BACKENDS[name])
        reason = _unavailable(name, device) or fmt.missing()
        if reason:  # the whole backend: one reason, whatever the precisions
            skipped[name] = reason
            continue
        for precision in precisions:
            if precision in fmt.precisions:
                plan.append((name, precision))
            else:
                skipped[row_label(name, precision)] = (f"the {fmt.name} format writes {', '.join(fmt.precisions)}, "
                                                       f"not {precision}")
    return plan, skipped


def _unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot be timed against torch on ``device`` beyond its format's own check, or None.

    TensorRT runs on a CUDA GPU only. Its format's check names a missing package first; on a machine without a GPU
    the missing GPU is the reason that matters. Timing it against torch rows on the CPU would compare two devices.
    """
    if backend != "tensorrt" or device.type == "cuda":
        return None
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and this machine has none (onnxruntime and openvino run on the CPU)"
    return "TensorRT runs on the GPU: time it with bench.device=cuda, against torch on the same GPU"


def export_backends(
    plan: list[tuple[str, str]], model: nn.Module, images: torch.Tensor, notes: list[str]
) -> list[BackendRun]:
    """Export ``model`` (the PyTorch fp32 model as built, on the CPU) once per planned pair at the shape of
    ``images``, load each artifact and measure its parity on ``images``. A failed export or load becomes a note in
    ``notes`` (that pair is not timed), not an exit: the other rows still come out."""
    from densekit.deploy.formats import FORMATS

    if not plan:
        return []
    cpu_images = images.detach().cpu().contiguous()
    runs: list[BackendRun] = []
    # Every runtime holds what it loaded (OpenVINO may map the .bin, which stays readable after unlinking on
    # POSIX), so the folder can go once the artifacts are loaded; nothing is left behind.
    with tempfile.TemporaryDirectory(prefix="densekit-bench-", ignore_cleanup_errors=True) as tmp:
        for backend, precision in plan:
            path = Path(tmp) / f"{backend}-{precision}{FORMATS.get(BACKENDS[backend]).suffix}"
            try:
                runs.append(_export_one(model, backend, precision, path, cpu_images))
            except Exception as err:  # noqa: BLE001 - exporters and runtimes raise many types; all mean "no rows"
                first_line = (str(err).strip().splitlines() or [""])[0]
                notes.append(f"{row_label(backend, precision)} skipped: export or load failed "
                             f"({type(err).__name__}: {first_line})")
    return runs


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF's logger at WARNING for the block: it logs a line per layer it leaves in float (hundreds for a detector),
    which would bury the benchmark's report. Imported first, as its import sets the logger to INFO."""
    with contextlib.suppress(ImportError):  # no NNCF: the export says so itself
        import nncf  # noqa: F401
    log = logging.getLogger("nncf")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _export_one(model: nn.Module, backend: str, precision: str, path: Path, images: torch.Tensor) -> BackendRun:
    """Export, load and check one artifact at ``path`` (``images``: the timed input, CPU, contiguous)."""
    from densekit.deploy.formats import export_artifact, load_artifact_model
    from densekit.deploy.formats.artifact import compare_outputs

    calibration, quiet = None, contextlib.nullcontext()
    if precision == "int8":  # random images: latency only (see the module docstring)
        calibration = torch.rand(CALIBRATION_IMAGES, *images.shape[1:], generator=torch.Generator().manual_seed(1))
        quiet = _quiet_nncf()
    start = time.perf_counter()
    with quiet:
        export_artifact(model, BACKENDS[backend], path, tuple(images.shape[-2:]), precision=precision,
                        batch=images.shape[0], calibration=calibration, calibration_images=CALIBRATION_IMAGES)
    export_s = time.perf_counter() - start
    # An artifact can be several files (OpenVINO's .xml + .bin, TensorRT's .engine + .engine.json).
    size = sum(f.stat().st_size for f in path.parent.glob(f"{path.stem}.*") if f.is_file())
    artifact = load_artifact_model(path)
    device = artifact.artifact.runtime.device  # TensorRT: the GPU; the shell follows for its anchors and buffers
    artifact = artifact.to(device)
    parity = compare_outputs(model, artifact, images)
    return BackendRun(backend, precision, artifact, images.to(device), export_s, size / 2**20, parity)


def backend_fns(runs: list[BackendRun], autocast_device: str | None = None) -> dict[str, Callable[[], object]]:
    """The timed functions of ``runs``, keyed ``label/mode`` in run order: each backend's primer (see the module
    docstring), its network row, its bare row (OpenVINO), then its end-to-end row. The rows that run the runtime
    alone come first, right after the primer; the end-to-end row's post-processing is PyTorch's, whose spinning
    threads the next runtime's primer absorbs.

    ``autocast_device``: the device type of the ``torch.autocast`` the torch rows run under (bench.precision fp16 /
    bf16), or None. The artifacts' precision is fixed at export, and densekit's post-processing around them stays in
    float as it would in a deployment, so their calls leave autocast.
    """
    fns: dict[str, Callable[[], object]] = {}
    for run in runs:
        model, images = run.model, run.images
        fns[primer_key(run.label)] = lambda m=model, x=images: m.network(x)
        fns[f"{run.label}/network"] = lambda m=model, x=images: m.network(x)
        if run.bare_label is not None:
            # The same compiled model and request densekit's path uses, fed the same input as numpy: the difference
            # between this row and the network row is densekit's binding of inputs and outputs.
            request, array = model.artifact.runtime.request, images.numpy()
            fns[f"{run.bare_label}/network"] = lambda r=request, a=array: r.infer({0: a}, share_inputs=True)
        fns[f"{run.label}/end_to_end"] = lambda m=model, x=images: m(x)
    if autocast_device is not None:
        fns = {key: _without_autocast(fn, autocast_device) for key, fn in fns.items()}
    return fns


def _without_autocast(fn: Callable[[], object], device_type: str) -> Callable[[], object]:
    def call() -> object:
        with torch.autocast(device_type, enabled=False):
            return fn()

    return call


def row_kinds(runs: list[BackendRun]) -> dict[str, tuple[str, str]]:
    """Row label -> (backend, precision) of every backend row, which each JSON row carries."""
    kinds: dict[str, tuple[str, str]] = {}
    for run in runs:
        for label in (run.label, run.bare_label):
            if label is not None:
                kinds[label] = (run.backend, run.precision)
    return kinds


def backend_ratios(runs: list[BackendRun], results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Ratios of median times, named ``<row> <mode> / <row> <mode>`` (``torch``: the densekit rows): each backend
    against torch, densekit's wrapping against the bare runtime call, and each lower precision against fp32."""
    def median(label: str, mode: str) -> float:
        return results[label][mode]["median_ms"]

    ratios: dict[str, float] = {}
    modes = list(results[TORCH_ROWS])
    for run in runs:
        for mode in modes:
            ratios[f"{run.label} {mode} / torch {mode}"] = median(run.label, mode) / median(TORCH_ROWS, mode)
        if run.bare_label is not None:
            bare = median(run.bare_label, "network")
            for mode in modes:
                ratios[f"{run.label} {mode} / {run.bare_label}"] = median(run.label, mode) / bare
            ratios[f"{run.bare_label} / torch network"] = bare / median(TORCH_ROWS, "network")
        fp32 = row_label(run.backend, "fp32")
        if run.precision != "fp32" and fp32 in results:
            for mode in modes:
                ratios[f"{run.label} {mode} / {fp32} {mode}"] = median(run.label, mode) / median(fp32, mode)
    return ratios


def backend_summary(
    runs: list[BackendRun], skipped: dict[str, str], results: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The results' ``backends``: each timed artifact (backend, format, precision, export seconds, size, parity
    against torch fp32), the skipped rows with why, and :func:`backend_ratios`."""
    rows = {
        run.label: {"backend": run.backend, "format": BACKENDS[run.backend], "precision": run.precision,
                    "export_s": run.export_s, "artifact_mb": run.artifact_mb, "parity": run.parity,
                    "bare_row": run.bare_label}
        for run in runs
    }
    return {"rows": rows, "skipped": skipped, "ratios": backend_ratios(runs, results),
            "calibration": f"{CALIBRATION_IMAGES} random images" if any(r.precision == "int8" for r in runs) else None}


def backend_report(r: dict[str, Any]) -> list[str]:
    """The printed lines of the results' ``backends`` (none when no backend but torch was asked for)."""
    info = r.get("backends")
    if not info:
        return []
    lines = ["", "backends  artifacts exported from the PyTorch fp32 model as built; parity on the timed input, "
                 "against it; torch = the densekit rows"]
    for label, row in info["rows"].items():
        p = row["parity"]
        lines.append(f"{label:<20}{row['format']} {row['precision']}, export {row['export_s']:.1f} s, "
                     f"{row['artifact_mb']:.1f} MiB   parity: max abs {p['max_abs']:.2e} (output scale "
                     f"{p['scale']:.3g}), mean rel {p['mean_rel']:.2e}")
    if info.get("calibration"):
        lines.append(f"int8 calibrated on {info['calibration']}: latency only, not accuracy")
    width = max((len(name) for name in info["ratios"]), default=0) + 2
    lines += [f"{name:<{width}}median {ratio:.3f}x" for name, ratio in info["ratios"].items()]
    return lines
