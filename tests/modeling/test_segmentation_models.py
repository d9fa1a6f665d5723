"""Semantic segmentation: LR-ASPP parity with torchvision, ESeg on the shared BiFPN, the loss, inference, checkpoints.

Inputs stay at 64-160 px so the whole file runs in seconds on two CPU cores; structural checks of the full-size
models run on the meta device.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

import densekit
from densekit import CheckpointError
from densekit.modeling.necks.bifpn import BiFPN
from densekit.modeling.segmenter import SegmentationLoss, Segmenter
from densekit.checkpoint.convert import load_state_dict_any
from densekit.checkpoint.weights import read_model_weights
from densekit.utils import count_parameters

SEG_MODELS = densekit.list_models(arch="segmenter")
ESEG_MODELS = [n for n in SEG_MODELS if n.startswith("eseg")]
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def torchvision_checkpoint(tmp_path_factory: pytest.TempPathFactory, randomise) -> Path:
    tv = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    randomise(tv)
    path = tmp_path_factory.mktemp("tv") / "lraspp.pth"
    torch.save(tv.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def small_lraspp() -> Segmenter:
    torch.manual_seed(0)
    return densekit.create_model("lraspp_mobilenet_v3_small", num_classes=5)


# --- (a) torchvision parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(128, 160), (520, 696)])  # 520x696: not a multiple of 32, and run unpadded
def test_lraspp_large_matches_torchvision(torchvision_checkpoint: Path, size: tuple[int, int]) -> None:
    tv = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).eval()
    tv.load_state_dict(torch.load(torchvision_checkpoint, weights_only=True))
    model = densekit.create_model("lraspp_mobilenet_v3_large", num_classes=21, weights=torchvision_checkpoint).eval()
    assert count_parameters(model) == count_parameters(tv) == 3_221_538  # torchvision's published num_params
    x = torch.rand(2 if size[0] < 256 else 1, 3, *size)
    with torch.inference_mode():
        ref = tv((x - IMAGENET_MEAN) / IMAGENET_STD)["out"]  # torchvision takes normalised input
        ours = model.forward_raw(x)  # densekit normalises [0, 1] input itself
    assert ours.shape == ref.shape == (x.shape[0], 21, *size)
    assert (ours - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_parity_needs_torchvisions_stride8_tap(torchvision_checkpoint: Path) -> None:
    """The tensors load either way; only reading the skip after features[4] reproduces torchvision."""
    tv = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).eval()
    tv.load_state_dict(torch.load(torchvision_checkpoint, weights_only=True))
    model = densekit.create_model(
        "lraspp_mobilenet_v3_large", num_classes=21, weights=torchvision_checkpoint, backbone={"stage_start_levels": []}
    ).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert (model.forward_raw(x) - tv((x - IMAGENET_MEAN) / IMAGENET_STD)["out"]).abs().max() > 1e-2


# --- (b) ESeg on the shared BiFPN ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ESEG_MODELS)
def test_eseg_uses_the_shared_bifpn_over_p3_p9(name: str) -> None:
    with torch.device("meta"):
        model = densekit.create_model(name)
    assert type(model.neck) is BiFPN
    assert (model.neck.min_level, model.neck.max_level) == (3, 9)
    assert model.num_classes == 19 and model.ignore_index == 255
    assert model.head.fusion_weight.numel() == 7


def test_eseg_output_shape() -> None:
    model = densekit.create_model("eseg_lite_s").eval()
    with torch.inference_mode():
        logits = model.forward_raw(torch.rand(2, 3, 128, 256))
    assert logits.shape == (2, 19, 128, 256)
    assert torch.isfinite(logits).all()


def test_segmentation_zoo() -> None:
    sizes = ["s", "m", "l"]
    expected = ["lraspp_mobilenet_v3_large", "lraspp_mobilenet_v3_small"]
    expected += [f"eseg_lite_{s}" for s in sizes] + [f"eseg_{s}" for s in sizes] + ["eseg_v2s"]
    assert sorted(SEG_MODELS) == sorted(expected)
    assert not set(SEG_MODELS) & set(densekit.list_models(arch="efficientdet"))


@pytest.mark.parametrize("name", SEG_MODELS)
def test_every_segmentation_config_resolves(name: str) -> None:
    cfg = densekit.load_model_config(name)
    assert cfg.arch == "segmenter" and cfg.name == name and list(cfg.image_size) == [1024, 2048]


# --- (c) training loss --------------------------------------------------------------------------------------------


def test_train_loss_is_finite_and_backpropagates(small_lraspp: Segmenter) -> None:
    model = small_lraspp.train()
    images = torch.rand(2, 3, 64, 64)
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[:, :10] = 255
    losses = model(images, [{"sem_seg": t} for t in labels])
    assert set(losses) == {"loss_seg"} and torch.isfinite(losses["loss_seg"])
    losses["loss_seg"].backward()
    assert model.head.low_classifier.weight.grad.abs().sum() > 0
    model.zero_grad()

    ignored = model(images, [{"sem_seg": torch.full((64, 64), 255)} for _ in range(2)])["loss_seg"]
    assert ignored.item() == 0.0  # every pixel ignored: zero, not NaN
    ignored.backward()


def test_ignored_pixels_do_not_affect_the_loss() -> None:
    loss = SegmentationLoss(ignore_index=255)
    logits = torch.randn(2, 4, 8, 8)
    target = torch.randint(0, 4, (2, 8, 8))
    target[:, :3] = 255
    changed = logits.clone()
    changed[:, :, :3] = torch.randn(2, 4, 3, 8) * 100
    assert torch.equal(loss(logits, target), loss(changed, target))
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    torch.testing.assert_close(loss(logits, target), expected)


def test_ohem_averages_the_hardest_pixels() -> None:
    logits = torch.randn(1, 3, 10, 10)
    target = torch.randint(0, 3, (1, 10, 10))
    target[0, 0] = 255
    per_pixel = torch.nn.functional.cross_entropy(logits, target, ignore_index=255, reduction="none")[target != 255]
    top = SegmentationLoss(ohem=True, ohem_thresh=None, ohem_min_kept=7)(logits, target)
    torch.testing.assert_close(top, per_pixel.topk(7).values.mean())
    # With a threshold, every pixel whose true-class probability is below it counts (here more than min_kept).
    thresh = SegmentationLoss(ohem=True, ohem_thresh=0.9, ohem_min_kept=1)(logits, target)
    torch.testing.assert_close(thresh, per_pixel[(-per_pixel).exp() < 0.9].mean())
    # Too few pixels under the threshold: the min_kept hardest still count.
    few = SegmentationLoss(ohem=True, ohem_thresh=1e-6, ohem_min_kept=5)(logits, target)
    torch.testing.assert_close(few, per_pixel.topk(5).values.mean())


def test_out_of_range_labels_are_refused(small_lraspp: Segmenter) -> None:
    with pytest.raises(ValueError, match="label 7 out of range for a 5-class model"):
        small_lraspp.train()(torch.rand(1, 3, 32, 32), [{"sem_seg": torch.full((32, 32), 7)}])
    with pytest.raises(ValueError, match=r"sem_seg must be \[32, 32\]"):
        small_lraspp.train()(torch.rand(1, 3, 32, 32), [{"sem_seg": torch.zeros(16, 16, dtype=torch.long)}])


# --- (d) inference ------------------------------------------------------------------------------------------------


def test_eval_returns_label_maps_of_the_unpadded_size(small_lraspp: Segmenter) -> None:
    model = small_lraspp.eval()
    images = [torch.rand(3, 67, 93), torch.rand(3, 50, 41)]
    with torch.inference_mode():
        out = model(images)
        raw = model.forward_raw(images[:1])
    assert [o["sem_seg"].shape for o in out] == [(67, 93), (50, 41)]
    assert all(o["sem_seg"].dtype == torch.long and int(o["sem_seg"].max()) < 5 for o in out)
    assert raw.shape == (1, 5, 67, 93)  # a list is zero-padded to one batch inside, cropped back
    assert torch.equal(out[0]["sem_seg"], raw[0].argmax(0))


# --- (e) errors ---------------------------------------------------------------------------------------------------


def test_wrong_checkpoint_names_bad_keys_and_loads_nothing(torchvision_checkpoint: Path, tmp_path: Path) -> None:
    model = densekit.create_model("lraspp_mobilenet_v3_large")  # 19 classes: torchvision's head has 21
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        found = read_model_weights(torchvision_checkpoint)
        load_state_dict_any(model, found.state_dict, found.source)
    assert "torchvision LR-ASPP layout" in str(err.value)
    assert "head.low_classifier.weight: checkpoint (21, 40, 1, 1) vs model (19, 40, 1, 1)" in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    with torch.device("meta"):
        eseg = densekit.create_model("eseg_lite_s")
    path = tmp_path / "eseg.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in eseg.state_dict().items()}, path)
    bad_keys = r"(?s)missing keys.*backbone\.features\.0.*unexpected keys.*backbone\.body\."
    with pytest.raises(CheckpointError, match=bad_keys):
        found = read_model_weights(path)
        load_state_dict_any(model, found.state_dict, found.source)


def test_unknown_head_type_and_misplaced_backbone_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown segmentation head type 'fcn'; choose one of eseg, lraspp"):
        densekit.create_model("lraspp_mobilenet_v3_small", head={"type": "fcn"})
    with pytest.raises(ValueError, match="backbone.dilated is a MobileNetV3 option"):
        densekit.create_model("eseg_lite_s", backbone={"dilated": True})
    with pytest.raises(ValueError, match="Key 'chanels' not in 'SegHeadConfig'"):
        densekit.create_model("eseg_lite_s", head={"chanels": 3})
