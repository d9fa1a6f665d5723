"""INT8 and BF16 inference on CPU: the network of a densekit model in lower precision, post-processing in float.

INT8 is PyTorch 2 export quantisation (PT2E, from ``torchao``: ``pip install torchao``, the ``quant`` extra): each
compile target of the model (:func:`densekit.modeling.base.compile_target`: EfficientDet's ``network``, the
segmenter's ``network`` / ``predict_labels``) is exported with :func:`torch.export.export`, annotated by the x86
inductor quantiser (static int8: per-channel symmetric weights, per-tensor affine activations, the recipe oneDNN's
VNNI / AMX int8 kernels run), calibrated on real images, converted to quantise / dequantise pairs and compiled by
inductor with freezing, which rewrites every ``dequantize -> conv -> quantize`` into one int8 oneDNN convolution.
NMS, box decoding, per-image cropping stay float and eager, exactly as in the float model.

Layers kept in float (``keep_float``): by default the output layers (:meth:`DenseModel.output_layers`: EfficientDet's
class-logit and box-regression convs, the segmentation head's classifiers: ESeg's one, LR-ASPP's two). Logits are read through a sigmoid against a
0.001-0.05 score threshold (detection) or compared against each other pixel by pixel (argmax): one 8-bit step of a
per-tensor scale spanning -10..+5 logits is ~0.06, which moves low-confidence scores across the threshold and flips
near-tied classes. Box deltas are scaled by the anchor size, so one 8-bit step is pixels at P7; measured on the
trained default Lite0 (docs/benchmarks.md), keeping the box conv float too halves the AP loss (-1.1 -> -0.6 points).
Both are ~10% of the FLOPs, but in float ~15% of Lite0's int8 latency at 320 (the class predictor is the
widest conv: 64 -> 810 channels on every level). Pass ``keep_float=()`` to quantise it too, or more module
names (e.g. ``"backbone.conv_stem"``, the first conv, which sees raw normalised pixels) to keep those in float.

BF16 is ``torch.autocast(bfloat16)`` inside the compiled (frozen) network: on CPUs with AVX512-BF16 or AMX oneDNN
runs bf16 convolutions; outputs are cast back to float32 before post-processing.
"""
from __future__ import annotations

import copy
import importlib
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = [
    "PRECISIONS", "QuantizationError", "bf16_supported", "calibration_batches", "calibration_set", "export_int8_onnx",
    "quantize", "save_quantized",
]

PRECISIONS = ("fp32", "bf16", "int8")


class QuantizationError(RuntimeError):
    """A model (or one of its layers) that this path cannot quantise; the float model is left as it was."""


def bf16_supported() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 / AMX; AVX512 emulates them slowly)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def quantize(
    model: nn.Module,
    calibration: Any = None,
    precision: str = "int8",
    *,
    num_images: int = 32,
    keep_float: Sequence[str] | None = None,
    compile: bool = True,
) -> nn.Module:
    """An inference copy of densekit ``model`` whose network runs in ``precision``; ``model`` is left untouched.

    Args:
        model: A densekit :class:`~densekit.modeling.base.DenseModel` (it needs ``compile_targets``).
        calibration: INT8 only: images to calibrate the activation ranges on, all of one size (the quantised
            program is specialised to it): a ``[B, 3, H, W]`` tensor, a list of ``[3, H, W]`` tensors, a dataset
            of ``(image, target)`` items or a loader of ``(images, targets)`` batches. Use real images of the
            deployment distribution (e.g. train-split images): random noise gives ranges real images exceed.
        precision: ``"int8"`` or ``"bf16"``.
        num_images: INT8: calibrate on at most this many images.
        keep_float: INT8: module names (as in ``model.named_modules()``) left in float; ``None``: the class
            predictor (see the module docstring for why).
        compile: Compile the result with inductor freezing (``compile_frozen``): the int8 / bf16 kernels are
            only used compiled. ``False`` runs the quantise / dequantise graph eagerly (float arithmetic emulating
            int8: for checking accuracy, slow) or bf16 autocast eagerly.

    Raises:
        QuantizationError: The model or a layer cannot be quantised (the message names it); ``model`` still runs.
        ValueError: Bad arguments (no calibration images, mixed image sizes, unknown precision / layer names).
    """
    from .optimize import compile_frozen, fold_batchnorm

    if precision not in ("int8", "bf16"):
        raise ValueError(f"precision={precision!r}: quantize takes 'int8' or 'bf16' (fp32 needs no quantisation)")
    targets = model.compile_targets() if hasattr(model, "compile_targets") else ()
    if not targets:
        raise QuantizationError(
            f"{type(model).__name__} has no compile targets (densekit.modeling.base.compile_target): only densekit "
            "models (EfficientDet, Segmenter) can be quantised here; the float model is unchanged"
        )
    out = copy.deepcopy(model).eval()
    fold_batchnorm(out)
    if precision == "bf16":
        if not bf16_supported():
            raise QuantizationError(
                "precision=bf16: this CPU has no native bf16 (oneDNN needs AVX512-BF16 or AMX; see lscpu flags "
                "avx512_bf16 / amx_bf16); use precision=fp32 or int8"
            )
        for name in targets:
            fn = _autocast_bf16(getattr(type(out), name).__get__(out))
            setattr(out, name, compile_frozen(fn) if compile else fn)
        return out
    batches = calibration_batches(out, calibration, num_images)
    names = _keep_float_names(out, keep_float)
    for name in targets:
        setattr(out, name, _Int8Target(_quantize_target(out, name, batches, names), name, batches[0], compile))
    return out


def calibration_batches(model: nn.Module, calibration: Any, num_images: int) -> list[torch.Tensor]:
    """``calibration`` (see :func:`quantize`) as stacked ``[B, 3, H, W]`` batches of at most ``num_images`` images."""
    if calibration is None:
        raise ValueError("precision=int8 needs calibration images (calibration=a dataset, loader or tensors)")
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration] if calibration.dim() == 4 else list(calibration)
    batches: list[torch.Tensor] = []
    count = 0
    for item in _iterate(calibration):
        images = item[0] if isinstance(item, (tuple, list)) and not isinstance(item[0], (int, float)) else item
        if isinstance(images, torch.Tensor) and images.dim() == 3:
            images = images[None]
        batch = model.stack_images(images)[0][: num_images - count]
        if batches and batch.shape[-2:] != batches[0].shape[-2:]:
            raise ValueError(
                f"calibration images must share one size (the int8 program is specialised to it): got "
                f"{tuple(batches[0].shape[-2:])} and {tuple(batch.shape[-2:])}; resize them, e.g. with the eval transform"
            )
        batches.append(batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float())
        count += batch.shape[0]
        if count >= num_images:
            break
    if not batches:
        raise ValueError("calibration is empty: int8 needs at least one image to measure activation ranges on")
    return batches


def calibration_set(task: Any, cfg: Any, num_images: int) -> torch.utils.data.Dataset:
    """The first ``num_images`` images of ``cfg.data``'s train split with the *eval* transform (the size and
    normalisation the model sees at inference): what ``tools/eval.py`` / ``tools/quantize.py`` calibrate on.
    Calibrating on the split that is scored would fit the ranges to the test images."""
    split = cfg.data.get("train_split", "train")
    dataset = task.build_dataset(cfg, split, train=False)
    return torch.utils.data.Subset(dataset, range(min(int(num_images), len(dataset))))


def _iterate(calibration: Any) -> Iterable[Any]:
    """A dataset (``__getitem__`` + ``__len__``) item by item, anything else as it iterates."""
    if hasattr(calibration, "__getitem__") and hasattr(calibration, "__len__") and not isinstance(calibration, list):
        return (calibration[i] for i in range(len(calibration)))
    return iter(calibration)


def _keep_float_names(model: nn.Module, keep_float: Sequence[str] | None) -> list[str]:
    """The module names to leave in float, checked against ``model`` so that a typo is an error, not a no-op."""
    if keep_float is None:  # the layers writing the raw outputs (e.g. ``head.class_net.predict.conv_pw``)
        keep_float = model.output_layers() if hasattr(model, "output_layers") else []
    modules = dict(model.named_modules())
    unknown = [name for name in keep_float if name not in modules]
    if unknown:
        raise ValueError(f"keep_float: no module named {unknown} in {type(model).__name__} (see model.named_modules())")
    return list(keep_float)


class _Target(nn.Module):
    """One compile target of a model as a module, for :func:`torch.export.export`."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model = model
        self.name = name

    def forward(self, batch: torch.Tensor) -> Any:
        return getattr(type(self.model), self.name)(self.model, batch)


def _quantize_target(model: nn.Module, name: str, batches: list[torch.Tensor], keep_float: list[str]) -> nn.Module:
    """Export, annotate, calibrate and convert ``model.<name>``: the int8 (quantise / dequantise) graph module."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as err:
        raise QuantizationError(
            f"precision=int8 needs torchao's PT2E quantisation ({err}; torch >= 2.10 moved it out of torch.ao): "
            "pip install torchao (or densekit[quant])"
        ) from err
    what = f"{type(model).__name__}.{name}"
    example = batches[0] if batches[0].shape[0] > 1 else batches[0].expand(2, -1, -1, -1).clone()
    try:  # batch size dynamic (eval loaders end on a smaller batch), image size static
        graph = torch.export.export(_Target(model, name), (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    except Exception as err:  # noqa: BLE001 - export raises many types; all mean "cannot be exported"
        raise QuantizationError(f"int8: torch.export of {what} failed ({type(err).__name__}: {err}); "
                                "the float model is unchanged and still runs") from err
    module = graph.module()
    _unique_call_sources(module)
    _unshare_conv_weights(module)
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    for layer in keep_float:
        quantizer.set_module_name_qconfig(f"model.{layer}", None)
    try:
        prepared = prepare_pt2e(module, quantizer)
        with torch.no_grad():
            for batch in batches:
                prepared(batch)
        return convert_pt2e(prepared)
    except Exception as err:  # noqa: BLE001 - the quantiser's failures name the node; pass them on with the model
        raise QuantizationError(f"int8: quantising {what} failed ({type(err).__name__}: {err}); pass the layer's "
                                "name in keep_float to leave it in float; the float model is unchanged") from err


def _unique_call_sources(module: torch.fx.GraphModule) -> None:
    """Give every op the source ``(call, module type)`` of the module call it came from, in place.

    A non-strict export records no ``source_fn_stack``, and torch's partition matcher then groups ops by the module
    *name*: a module called several times (EfficientDet's head shares its depthwise convs and activation across
    pyramid levels) becomes one "partition" with several outputs, which the x86 quantiser refuses ("Input
    partition has more than one output node"). The ``nn_module_stack`` key is unique per call (``...@1``).
    """
    for node in module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack or node.meta.get("source_fn_stack") is not None:
            continue
        call, (_, cls) = list(stack.items())[-1]
        if isinstance(cls, str):
            path, _, qualname = cls.rpartition(".")
            try:
                cls = getattr(importlib.import_module(path), qualname)
            except (ImportError, AttributeError):
                continue
        # A Conv2d subclass (timm's Conv2dSame: TF "same" padding, then the conv) is a conv to the quantiser, which
        # matches partitions by exact type: under its own class the stem and every stride-2 conv stayed float.
        if isinstance(cls, type) and issubclass(cls, nn.Conv2d):
            cls = nn.Conv2d
        node.meta["source_fn_stack"] = [(call, cls)]


def _mean_gap(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Mean absolute difference of ``outputs`` from ``reference`` over the reference's mean magnitude."""
    pairs = list(zip(outputs, reference, strict=True))
    return sum(float((o - r).abs().sum()) for o, r in pairs) / (sum(float(r.abs().sum()) for _, r in pairs) or 1.0)


def _unshare_conv_weights(module: torch.fx.GraphModule) -> int:
    """Give every convolution its own copy of a weight that several convolutions read, in place; returns how many.

    EfficientDet's head runs the same depthwise convs on every pyramid level. Quantised, the shared weight becomes
    one constant behind several dequantise nodes, which inductor merges, and its int8 convolution fusion matches only
    a weight dequantise with a single user: the shared convs then ran in float, their weights dequantised on every
    call (Lite0 at 320: 40 of 182 convolutions, ~10% of the int8 latency). The copies cost the weights' size again
    (a few KB for the head's depthwise kernels).
    """
    copies = 0
    for node in list(module.graph.nodes):
        if node.op != "get_attr":
            continue
        readers = [u for u in node.users if u.op == "call_function" and u.target in _CONVS and u.args[1] is node]
        for reader in readers[1:]:
            name = f"_unshared_{node.target.replace('.', '_')}_{copies}"
            module.register_buffer(name, operator.attrgetter(node.target)(module).detach().clone())
            with module.graph.inserting_before(reader):
                own = module.graph.get_attr(name)
            own.meta = dict(node.meta)
            reader.replace_input_with(node, own)
            copies += 1
    if copies:
        module.graph.lint()
        module.recompile()
    return copies


_CONVS = (torch.ops.aten.conv2d.default, torch.ops.aten.conv2d.padding, torch.ops.aten.convolution.default)


class _Int8Target:
    """A quantised compile target: the int8 graph (compiled or eager) behind the input-size check it needs."""

    def __init__(self, graph: nn.Module, name: str, example: torch.Tensor, compile: bool) -> None:
        from .optimize import compile_frozen

        self.graph = graph  # the quantise / dequantise graph module: what save_quantized exports
        self.name = name
        self.size = tuple(example.shape[-2:])
        self.example = example[:1]
        self._call: Callable[[torch.Tensor], Any] = compile_frozen(graph) if compile else graph
        if compile:  # compile now, so that a failure shows in quantize and not at the first real call
            with torch.inference_mode():
                self._call(example)

    def __call__(self, batch: torch.Tensor) -> Any:
        if tuple(batch.shape[-2:]) != self.size or batch.dtype != torch.float32:
            raise ValueError(
                f"the int8 {self.name} was calibrated and exported for float32 {self.size[0]}x{self.size[1]} "
                f"inputs, got {batch.dtype} {tuple(batch.shape[-2:])}: resize the images or quantise again at this size"
            )
        return self._call(batch)


def _autocast_bf16(fn: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
    """``fn`` under bf16 autocast, with floating outputs back in float32 for the float post-processing."""

    def call(batch: torch.Tensor) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(batch)
        return tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out)

    return call


def save_quantized(model: nn.Module, path: Any) -> list[str]:
    """Save ``model``'s int8 programs (from :func:`quantize`) as one :func:`torch.export.save` ``.pt2`` file.

    The saved program is ``network`` (per-level head outputs, or a segmenter's logits), re-exported from its
    quantise / dequantise graph: ``torch.export.load(path).module()`` runs it, and ``torch.compile`` with freezing
    (``densekit.deploy.optimize.compile_frozen``) turns it back into int8 kernels. Returns the names saved.
    """
    from ..checkpoint.io import atomic_write

    target = vars(model).get("network")
    if not isinstance(target, _Int8Target):
        raise ValueError("save_quantized needs a model returned by quantize(..., precision='int8')")
    program = torch.export.export(target.graph, (target.example.expand(2, -1, -1, -1).clone(),),
                                  dynamic_shapes=({0: torch.export.Dim.AUTO},))
    with atomic_write(path, "wb") as f:
        torch.export.save(program, f)
    return ["network"]


def export_int8_onnx(model: nn.Module, path: Any, opset: int = 18, rtol: float = 5e-2) -> dict[str, float]:
    """Export ``model``'s int8 ``network`` as a QDQ ONNX graph (``QuantizeLinear`` / ``DequantizeLinear`` around
    float ``Conv``) and check it in onnxruntime against torch's quantise / dequantise graph.

    torch's dynamo exporter translates PT2E's ``quantized_decomposed`` ops; the TorchScript exporter
    (``dynamo=False``) cannot take an exported graph at all. Parity is the mean absolute difference over the mean
    output magnitude, with onnxruntime's graph optimisations off (``exact``: the QDQ graph as written; must be
    within ``rtol``, else ``QuantizationError`` and nothing is written) and on (``fused``: QDQ + Conv fused into
    integer kernels). ``max_*`` are the largest differences over the largest output magnitude; ``*_vs_fp32`` the
    mean differences of torch's and onnxruntime's int8 outputs from the float network's, for scale.

    Why the two int8 runtimes are not bit-equal: the graphs are the same op for op, but float convolutions summed in
    another order put a few values on the other side of a rounding boundary (the first mismatches are 1-step flips in
    ~1e-5 of a quantised tensor), and every squeeze-excitation block's global pooling spreads a flip over all its
    channels. On a tiny D0 with random BN statistics that ends ~3% apart, as far as either is from fp32 (both ~3%);
    with BN at its initialisation they agree exactly.
    """
    import onnxruntime as ort

    from ..checkpoint.io import atomic_write

    target = vars(model).get("network")
    if not isinstance(target, _Int8Target):
        raise ValueError("export_int8_onnx needs a model returned by quantize(..., precision='int8')")
    example = target.example
    program = torch.export.export(target.graph, (example,))
    data = torch.onnx.export(program, (example,), input_names=["images"], opset_version=opset, dynamo=True)
    data = data.model_proto.SerializeToString()
    with torch.no_grad():
        ref = torch.utils._pytree.tree_leaves(target.graph(example))
        fp32 = torch.utils._pytree.tree_leaves(_Target(model, "network")(example))  # the float network
    scale = max(float(r.abs().max()) for r in ref) or 1.0
    diffs: dict[str, float] = {"torch_vs_fp32": _mean_gap(ref, fp32)}
    for name, level in (("exact", ort.GraphOptimizationLevel.ORT_DISABLE_ALL), ("fused", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        got = session.run(None, {"images": example.numpy()})
        pairs = [(torch.from_numpy(g), r) for g, r in zip(got, ref, strict=True)]
        diffs[f"max_{name}"] = max(float((g - r).abs().max()) for g, r in pairs) / scale
        diffs[name] = _mean_gap([g for g, _ in pairs], ref)
        diffs[f"{name}_vs_fp32"] = _mean_gap([g for g, _ in pairs], fp32)
    if diffs["exact"] > rtol:
        raise QuantizationError(f"int8 ONNX export: onnxruntime's outputs differ from torch's by {diffs['exact']:.3g} "
                                "(mean over the mean magnitude); nothing written")
    with atomic_write(path, "wb") as f:
        f.write(data)
    return diffs
