"""``optimize_for_inference``: BN folding + channels_last give the original's outputs, and leave the original alone.

Random weights *and* random BN statistics (a BN at its init, mean 0 / var 1, folds to almost nothing and would hide
a wrong fold); inputs stay at 128 px so the file runs in seconds on two CPU cores.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import densekit
from densekit.deploy.optimize import FoldedConvTower, fold_batchnorm

RAW_TOL = 1e-4


def build(name: str, randomise) -> nn.Module:
    torch.manual_seed(0)
    model = densekit.create_model(name).eval()
    randomise(model)
    return model


def images(size: int = 128, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def max_diff(a: object, b: object) -> float:
    """Largest absolute difference between two (nested lists / tuples of) tensors of the same structure."""
    if isinstance(a, torch.Tensor):
        return (a.float() - b.float()).abs().max().item()
    return max(max_diff(x, y) for x, y in zip(a, b, strict=True))


def close_enough(a: object, b: object) -> bool:
    """Within ``RAW_TOL`` absolute for outputs of order one; relative to the output's scale where that is larger.

    Random-weight networks can reach logits of O(100), where float32 rounding alone exceeds an absolute 1e-4.
    """
    scale = max_abs(a)
    assert scale > 1e-2, "outputs too small for the tolerance to mean anything"
    return max_diff(a, b) <= RAW_TOL * max(1.0, scale)


def max_abs(a: object) -> float:
    if isinstance(a, torch.Tensor):
        return a.abs().max().item()
    return max(max_abs(x) for x in a)


def count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(type(m) is kind for m in model.modules())


@pytest.fixture(scope="module")
def d0(randomise) -> nn.Module:
    return build("efficientdet_d0", randomise)


def test_efficientdet_d0_raw_and_detections_match(d0: nn.Module) -> None:
    x = images()
    state = {k: v.clone() for k, v in d0.state_dict().items()}
    fast = densekit.optimize_for_inference(d0)
    # Every BN is folded: the towers' per-level ones too, and no plain BN survives anywhere.
    assert count(fast, nn.BatchNorm2d) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) == 0
    assert sum(isinstance(m, FoldedConvTower) for m in fast.modules()) == 2
    assert not fast.training
    with torch.inference_mode():
        raw, raw_fast = d0.forward_raw(x), fast.forward_raw(x.contiguous(memory_format=torch.channels_last))
        det, det_fast = d0(x), fast(x)
    assert close_enough(raw, raw_fast)
    for a, b in zip(det, det_fast, strict=True):
        # Near-tied scores may reorder; the top detections and their boxes agree.
        assert torch.equal(a["labels"][:10], b["labels"][:10])
        torch.testing.assert_close(a["scores"], b["scores"], atol=RAW_TOL, rtol=0)
        torch.testing.assert_close(a["boxes"][:10], b["boxes"][:10], atol=1e-3, rtol=0)
    # The original is untouched: same modules, same tensors, still plain BNs, same layout.
    assert count(d0, nn.BatchNorm2d) > 0 and not any(isinstance(m, FoldedConvTower) for m in d0.modules())
    after = d0.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert all(p.is_contiguous() for p in d0.parameters())


def test_original_training_mode_is_kept(d0: nn.Module) -> None:
    d0.train()
    try:
        fast = densekit.optimize_for_inference(d0, channels_last=False)
        assert d0.training and not fast.training
        assert all(m.training for m in d0.modules())
    finally:
        d0.eval()


@pytest.mark.parametrize("name", ["eseg_lite_s", "lraspp_mobilenet_v3_small"])
def test_segmenters_match(name: str, randomise) -> None:
    model = build(name, randomise)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = images()
    fast = densekit.optimize_for_inference(model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) == 0
    with torch.inference_mode():
        raw, raw_fast = model.forward_raw(x), fast.forward_raw(x)
        seg, seg_fast = model(x), fast(x)
    assert close_enough(raw, raw_fast)
    for a, b in zip(seg, seg_fast, strict=True):
        # argmax may flip only where two logits tie within the tolerance
        assert (a["sem_seg"] != b["sem_seg"]).float().mean().item() < 1e-3
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_options_off_is_a_plain_eval_copy(d0: nn.Module) -> None:
    plain = densekit.optimize_for_inference(d0, channels_last=False, fold_bn=False)
    assert plain is not d0 and count(plain, nn.BatchNorm2d) == count(d0, nn.BatchNorm2d)
    with torch.inference_mode():
        assert max_diff(d0.forward_raw(images()), plain.forward_raw(images())) == 0.0


def test_fold_batchnorm_needs_eval_mode() -> None:
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train())


def test_shared_conv_is_not_folded() -> None:
    # The same conv feeding two BNs: folding either would change the other path.
    conv = nn.Conv2d(3, 4, 1)
    model = nn.Sequential(nn.Sequential(conv, nn.BatchNorm2d(4)), nn.Sequential(conv, nn.BatchNorm2d(4))).eval()
    assert fold_batchnorm(model) == 0


def test_compile_failure_warns_and_returns_uncompiled(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    x = torch.rand(1, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        out = densekit.optimize_for_inference(model, compile=True, example_input=x)
    with torch.inference_mode():
        assert max_diff(model(x), out(x)) < RAW_TOL
    with pytest.raises(RuntimeError, match="torch.compile failed"), warnings.catch_warnings():
        warnings.simplefilter("error")
        densekit.optimize_for_inference(model, compile=True, example_input=x, strict=True)


# Compiling takes about a minute per model on 2 cores: `make test-all` runs these (the failure path above stays in CI).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientdet_d0", "lraspp_mobilenet_v3_small"])
def test_compiled_model_matches_eager(name: str, randomise) -> None:
    """torch.compile with inductor freezing, through the model's compile targets (normalisation + network, and the
    segmenter's upsample + argmax): the same raw outputs and predictions as the eager model, for tensor and list
    inputs, while the original model stays eager."""
    overrides = {"neck": {"repeats": 1}, "head": {"repeats": 1}} if name.startswith("efficientdet") else {}
    torch.manual_seed(0)
    model = densekit.create_model(name, **overrides).eval()
    randomise(model)
    x = images(batch=1)
    fast = densekit.optimize_for_inference(model, compile=True, example_input=x, strict=True)
    assert all(callable(getattr(fast, t)) and t in vars(fast) for t in fast.compile_targets())
    assert not any(t in vars(model) for t in model.compile_targets())
    with torch.inference_mode():
        assert close_enough(model.forward_raw(x), fast.forward_raw(x))
        eager, compiled = model(x), fast([x[0]])  # a list input goes through the same compiled function
    if name.startswith("efficientdet"):
        torch.testing.assert_close(eager[0]["scores"][:10], compiled[0]["scores"][:10], atol=RAW_TOL, rtol=0)
        assert torch.equal(eager[0]["labels"][:10], compiled[0]["labels"][:10])
    else:
        assert (eager[0]["sem_seg"] != compiled[0]["sem_seg"]).float().mean().item() < 1e-3


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN's fused convolutions need mkldnn")
def test_compile_frozen_fuses_the_activation_into_a_prepacked_convolution() -> None:
    """Freezing must reach inductor's CPU weight-packing pass (``options={"freezing": True}`` did not): the compiled
    call runs oneDNN's fused conv + ReLU, and still computes the module's output."""
    from torch.profiler import profile

    from densekit.deploy.optimize import compile_frozen

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    compiled = compile_frozen(model)
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        compiled(x)
        with profile() as prof:
            y = compiled(x)
        expected = model(x)
    ops = {event.key for event in prof.key_averages()}
    assert any("_convolution_pointwise" in op for op in ops), sorted(ops)
    assert "aten::relu" not in ops and "aten::mkldnn_convolution" not in ops
    assert max_diff(y, expected) < 1e-5


def test_lower_precision_refuses_the_fp32_arguments_it_would_drop_and_warns_without_compile() -> None:
    model = densekit.create_model("lraspp_mobilenet_v3_small", num_classes=3).eval()
    images = torch.rand(1, 3, 64, 64)
    for dropped in ({"example_input": images}, {"strict": True}, {"compile_mode": "max-autotune"}, {"fold_bn": False}):
        with pytest.raises(ValueError, match=f"precision='bf16'\\) does not use {next(iter(dropped))}"):
            densekit.optimize_for_inference(model, precision="bf16", **dropped)
    with pytest.warns(UserWarning, match="without compile=True runs the quantise / dequantise reference path"):
        fast = densekit.optimize_for_inference(model, precision="bf16")
    assert fast(images)[0]["sem_seg"].shape == (64, 64)
