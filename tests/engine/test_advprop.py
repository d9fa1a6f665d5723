"""AdvProp: what each BatchNorm set sees, the attack, evaluation on the main BNs, checkpoints, `_ap` weights."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import densekit
from densekit.checkpoint import train_state as ckpt
from densekit.checkpoint.convert import load_state_dict_any
from densekit.checkpoint.weights import read_model_weights
from densekit.config import IMAGENET_MEAN, TrainConfig
from densekit.deploy.optimize import optimize_for_inference
from densekit.engine.advprop import AdvProp
from densekit.engine.trainer import Trainer
from densekit.modeling.dual_bn import DualBatchNorm2d, convert_to_dual_bn, dual_bns, use_aux_bn

CPU = torch.device("cpu")


def _model() -> nn.Module:
    """The engine tests' tiny D0 without drop-path, so that a forward pass is a deterministic function of its input."""
    torch.manual_seed(0)
    return densekit.create_model(
        "efficientdet_d0", num_classes=2, image_size=[64, 64], neck={"repeats": 1, "channels": 16}, head={"repeats": 1},
        backbone={"drop_path_rate": 0.0},
    )


def _batch(n: int = 2) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Bright squares on dark 64-px images, one box each (the engine tests' data)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 64, 64, generator=g) * 0.2
    targets = []
    for i in range(n):
        x0, y0 = 4 + 3 * i, 6 + 2 * i
        images[i, :, y0 : y0 + 24, x0 : x0 + 24] = 0.9
        targets.append({"boxes": torch.tensor([[x0, y0, x0 + 24.0, y0 + 24.0]]), "labels": torch.tensor([i % 2])})
    return images, targets


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def _advprop_cfg(**overrides) -> TrainConfig:
    base = dict(batch_size=2, max_steps=2, lr=0.01, warmup_epochs=0.0, checkpoint_every=2, ema_decay=0.9, log_every=1,
                num_workers=0, advprop=True, advprop_steps=2, advprop_epsilon=4.0, advprop_step_size=2.0,
                channels_last=False)  # the references below run NCHW; these tests compare BN statistics exactly
    return TrainConfig(**{**base, **overrides})


def test_main_bns_see_only_clean_data_and_aux_bns_only_the_final_adversarial_batch(tmp_path: Path) -> None:
    model = _model()
    before = copy.deepcopy(model)  # plain: what the statistics should be updated from
    trainer = Trainer(model, [_batch()], _advprop_cfg(ema_decay=0.0), tmp_path, CPU)
    seen: list[torch.Tensor] = []
    attack = trainer.advprop.attack
    trainer.advprop.attack = lambda *args: seen.append(attack(*args)) or seen[-1]
    images, targets = _batch()
    trainer.model.train()
    trainer.run_step(images, targets)
    assert set(trainer.losses) == {"loss_cls", "loss_box", "adv_loss_cls", "adv_loss_box"}

    (adv,) = seen
    assert 0 < (adv - images).abs().max() <= 4 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    clean_ref, adv_ref = copy.deepcopy(before).train(), copy.deepcopy(before).train()
    clean_ref(images, targets)
    adv_ref(adv, targets)
    state = trainer.model.state_dict()
    for key, expected in _bn_buffers(clean_ref).items():  # the main BNs keep the plain model's keys
        torch.testing.assert_close(state[key], expected, rtol=0, atol=1e-6, msg=key)
    for key, expected in _bn_buffers(adv_ref).items():  # two attack passes ran, yet one adversarial update
        aux_key = key.rsplit(".", 1)[0] + ".aux." + key.rsplit(".", 1)[1]
        torch.testing.assert_close(state[aux_key], expected, rtol=0, atol=1e-6, msg=aux_key)
    main_means = [bn.main.running_mean for bn in dual_bns(trainer.model)]
    aux_means = [bn.aux.running_mean for bn in dual_bns(trainer.model)]
    assert any(not torch.equal(m, a) for m, a in zip(main_means, aux_means))


def test_pgd_raises_the_loss_and_leaves_parameter_gradients_alone() -> None:
    model = _model().train()
    convert_to_dual_bn(model)
    images, targets = _batch()
    pgd = AdvProp(steps=3, epsilon=4.0, step_size=1.0, random_start=False)
    adv = pgd.attack(model, images, targets)
    assert all(p.grad is None for p in model.parameters())
    assert (adv - images).abs().max() <= 4 / 255 + 1e-6
    with torch.no_grad(), use_aux_bn(model):
        clean_loss = sum(model(images, targets).values())
        adv_loss = sum(model(adv, targets).values())
    assert adv_loss > clean_loss


def test_dual_bn_model_evaluates_like_the_plain_model_with_its_main_bns(tmp_path: Path) -> None:
    model = _model()
    trainer = Trainer(model, [_batch(), _batch()], _advprop_cfg(), tmp_path, CPU)
    trainer.train()  # two steps: main and aux statistics now differ
    dual = trainer.model.eval()
    plain = _model().eval()
    found = read_model_weights(tmp_path / "checkpoints" / "last.pth")
    load_state_dict_any(plain, found.state_dict, found.source)  # aux tensors dropped, main ones loaded
    assert not dual_bns(plain)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = plain.forward_raw(images)
        for a, b in zip(dual.forward_raw(images), ref):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
        optimized = optimize_for_inference(dual, channels_last=False)
        assert not dual_bns(optimized) and dual_bns(dual)  # the original keeps its twins
        for a, b in zip(optimized.forward_raw(images), ref):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_checkpoint_keeps_both_sets_and_resumes_them(tmp_path: Path) -> None:
    trainer = Trainer(_model(), [_batch(), _batch()], _advprop_cfg(max_steps=1, checkpoint_every=1), tmp_path, CPU)
    trainer.train()
    saved = ckpt.load_checkpoint(tmp_path / "checkpoints" / "last.pth")
    plain_keys = set(_model().state_dict())
    aux_keys = set(saved["model"]) - plain_keys
    assert plain_keys <= set(saved["model"]) and aux_keys and all(".aux." in k for k in aux_keys)
    assert set(saved["ema"]["module"]) == set(saved["model"])

    resumed = Trainer(_model(), [_batch(), _batch()], _advprop_cfg(max_steps=1), tmp_path, CPU)
    assert resumed.resume_if_possible()
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, saved["model"][key], rtol=0, atol=0, msg=key)
    # The EMA weights (what evaluation reads) load into a plain model too.
    weights = read_model_weights(tmp_path / "checkpoints" / "last.pth", prefer_ema=True)
    plain = _model()
    load_state_dict_any(plain, weights.state_dict, weights.source)
    torch.testing.assert_close(plain.state_dict()["backbone.body.bn1.running_mean"],
                               saved["ema"]["module"]["backbone.body.bn1.running_mean"])


def test_wrapped_bn_keys_are_the_plain_ones_plus_aux() -> None:
    bn = nn.BatchNorm2d(4)
    dual = DualBatchNorm2d(bn)
    assert list(dual.state_dict()) == [f"aux.{k}" for k in bn.state_dict()] + list(bn.state_dict())
    target = DualBatchNorm2d(nn.BatchNorm2d(4))
    state = {k: torch.full_like(v, 3) for k, v in dual.state_dict().items()}
    target.load_state_dict(state)
    assert torch.equal(target.main.running_mean, torch.full((4,), 3.0))
    with pytest.raises(ValueError, match="no BatchNorm"):
        convert_to_dual_bn(nn.Sequential(nn.Conv2d(3, 3, 1)))


@pytest.mark.parametrize("bad, key", [({"steps": 0}, "advprop_steps"), ({"epsilon": 0.0}, "advprop_epsilon")])
def test_bad_settings_are_refused_by_name(bad: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        AdvProp(**bad)


@pytest.mark.parametrize("name", ["tf_efficientnet_b0.ap_in1k", "tf_efficientnet_b0_ap"])
def test_advprop_imagenet_weights_bring_their_normalisation(name: str) -> None:
    model = densekit.create_model("efficientdet_d0", backbone={"name": name})
    assert model.pixel_mean.flatten().tolist() == [0.5] * 3 and model.pixel_std.flatten().tolist() == [0.5] * 3
    assert model.config.pixel_mean == [0.5] * 3  # recorded in the config, hence in checkpoints
    explicit = densekit.load_model_config("efficientdet_d0", backbone={"name": name}, pixel_mean=[0.4] * 3)
    untagged = densekit.load_model_config("efficientdet_d0")
    assert explicit.pixel_mean == [0.4] * 3 and untagged.pixel_mean == IMAGENET_MEAN


def test_advprop_weights_layout_loads_into_the_tagged_backbone() -> None:
    # The `_ap` checkpoints are EfficientNet-B0 state_dicts: timm's full-model layout loads, classifier ignored.
    full = timm.create_model("tf_efficientnet_b0")
    model = densekit.create_model("efficientdet_d0", backbone={"name": "tf_efficientnet_b0.ap_in1k"})
    model.backbone.load_weights(full.state_dict(), source="tf_efficientnet_b0_ap weights")
    torch.testing.assert_close(model.backbone.body.conv_stem.weight, full.conv_stem.weight)
