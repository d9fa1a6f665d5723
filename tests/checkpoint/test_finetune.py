"""Fine-tuning across class counts: everything but the class predictor loads, rows of shared class names are kept."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import densekit
from densekit import CheckpointError
from densekit.checkpoint.convert import convert_effdet
from densekit.checkpoint.finetune import load_for_finetuning, match_classes
from densekit.checkpoint.weights import ModelWeights, read_model_weights
from densekit.labels import coco_category_names

effdet = pytest.importorskip("effdet")
from effdet import EfficientDet as EffDet, get_efficientdet_config  # noqa: E402

TINY = dict(image_size=[128, 128])
COCO_LABEL = {name: cat_id - 1 for cat_id, name in coco_category_names().items()}  # public layout: label = id - 1


@pytest.fixture(scope="module")
def public_d0(tmp_path_factory, randomise) -> Path:
    """A tf_efficientdet_d0 checkpoint in efficientdet-pytorch's layout (90 classes), random non-trivial weights."""
    model = EffDet(get_efficientdet_config("tf_efficientdet_d0"), pretrained_backbone=False)
    randomise(model, seed=3)
    path = tmp_path_factory.mktemp("public") / "tf_efficientdet_d0.pth"
    torch.save(model.state_dict(), path)
    return path


def test_coco_checkpoint_fine_tunes_into_three_classes_keeping_matching_rows(public_d0: Path, caplog) -> None:
    names = ["person", "Traffic_Light", "my widget"]
    model = densekit.create_model("efficientdet_d0", num_classes=3, class_names=names, **TINY)
    fresh_bias = model.head.class_net.predict.conv_pw.bias.detach().clone()
    with caplog.at_level(logging.INFO, logger="densekit.checkpoint.finetune"):
        report = load_for_finetuning(model, read_model_weights(public_d0))

    ref = convert_effdet(torch.load(public_d0, weights_only=True), len(model.backbone.feature_specs))
    predictor = set(model.class_predictor())
    own = model.state_dict()
    assert set(own) == set(ref)
    for key in set(own) - predictor:
        assert torch.equal(own[key], ref[key]), key
    assert report.kept_classes == {0: COCO_LABEL["person"], 1: COCO_LABEL["traffic light"]}
    weight, bias = own["head.class_net.predict.conv_pw.weight"], own["head.class_net.predict.conv_pw.bias"]
    ref_w, ref_b = ref["head.class_net.predict.conv_pw.weight"], ref["head.class_net.predict.conv_pw.bias"]
    anchors = model.anchor_generator.num_anchors
    for a in range(anchors):  # channel a * C + c: anchor a, class c
        for new, old in report.kept_classes.items():
            assert torch.equal(weight[a * 3 + new], ref_w[a * 90 + old])
            assert torch.equal(bias[a * 3 + new], ref_b[a * 90 + old])
        # the unmatched class keeps the fresh prior-probability bias of training from scratch
        assert torch.equal(bias[a * 3 + 2], fresh_bias[a * 3 + 2])
    assert bias[2].item() == pytest.approx(-4.595, abs=1e-3)  # logit(0.01)
    lines = [r.getMessage() for r in caplog.records if "fine-tuning" in r.getMessage()]
    assert len(lines) == 1
    assert "90 -> 3 classes" in lines[0] and "head.class_net.predict.conv_pw.weight" in lines[0]
    assert "(person, Traffic_Light)" in lines[0]


def test_recorded_names_of_a_densekit_run_are_matched(tmp_path: Path) -> None:
    old = densekit.create_model("efficientdet_lite0", num_classes=4, class_names=["a", "b", "cat", "d"], **TINY)
    path = tmp_path / "last.pth"
    torch.save({"model": old.state_dict(), "config": {"model": {"num_classes": 4, "class_names": ["a", "b", "cat", "d"]}}}, path)
    new = densekit.create_model("efficientdet_lite0", num_classes=2, class_names=["cat", "zebra"], **TINY)
    report = load_for_finetuning(new, read_model_weights(path))
    assert report.kept_classes == {0: 2}
    w = new.head.class_net.predict.conv_pw.weight
    ref = old.head.class_net.predict.conv_pw.weight
    assert all(torch.equal(w[a * 2], ref[a * 4 + 2]) for a in range(9))


def test_unnamed_heads_keep_no_rows() -> None:
    old = densekit.create_model("efficientdet_lite0", num_classes=5, **TINY)
    new = densekit.create_model("efficientdet_lite0", num_classes=2, **TINY)
    report = load_for_finetuning(new, ModelWeights(old.state_dict(), "run"))
    assert report.kept_classes == {} and report.checkpoint_classes == 5
    assert match_classes(None, ["a"]) == {} and match_classes(["class 0"], None) == {}


def test_same_class_count_is_a_plain_load() -> None:
    old = densekit.create_model("efficientdet_lite0", num_classes=3, **TINY)
    new = densekit.create_model("efficientdet_lite0", num_classes=3, **TINY)
    report = load_for_finetuning(new, ModelWeights(old.state_dict(), "run"))
    assert report.reinitialised == []
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))


def test_backbone_of_another_width_is_still_refused_and_nothing_loads(tmp_path: Path) -> None:
    d1 = EffDet(get_efficientdet_config("tf_efficientdet_d1"), pretrained_backbone=False)
    model = densekit.create_model("efficientdet_d0", num_classes=3, **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_for_finetuning(model, ModelWeights(d1.state_dict(), "d1 checkpoint"))
    assert "nothing was loaded" in str(err.value) and "wrongly shaped keys" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_small", "eseg_lite_s"])
def test_segmenter_classifiers_fine_tune(name: str) -> None:
    old = densekit.create_model(name, num_classes=19, class_names=[f"c{i}" for i in range(18)] + ["sky"])
    new = densekit.create_model(name, num_classes=3, class_names=["road", "sky", "x"])
    report = load_for_finetuning(new, ModelWeights(old.state_dict(), "cityscapes run", {"class_names": list(old.config.class_names)}))
    assert report.kept_classes == {1: 18} and set(report.reinitialised) == set(new.class_predictor())
    for key in new.class_predictor():
        assert torch.equal(new.state_dict()[key][1], old.state_dict()[key][18])
    others = set(new.state_dict()) - set(new.class_predictor())
    assert all(torch.equal(new.state_dict()[k], old.state_dict()[k]) for k in others)


def test_create_model_with_another_class_count_fine_tunes(public_d0: Path) -> None:
    model = densekit.create_model("efficientdet_d0", num_classes=2, class_names=["dog", "kite2"], weights=public_d0, **TINY)
    ref = torch.load(public_d0, weights_only=True)
    assert model.num_classes == 2
    w = model.head.class_net.predict.conv_pw.weight
    assert torch.equal(w[0], ref["class_net.predict.conv_pw.weight"][COCO_LABEL["dog"]])
    assert torch.equal(model.head.box_net.predict.conv_pw.weight, ref["box_net.predict.conv_pw.weight"])
