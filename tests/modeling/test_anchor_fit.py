"""Anchors fitted to the data (densekit/modeling/anchor_fit.py): the anchor recall is the exhaustive box_iou maximum
over densekit's anchors, the default anchors miss 1:6 boxes and the suggested settings (Hydra overrides that compose)
reach them, and the check tools/train.py calls warns with the command that fits anchors."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from densekit.config import register_configs
from densekit.modeling.anchor_fit import (
    WARN_BELOW, AnchorGeometry, AnchorSetting, anchor_recall, boxes_at_input_size, check_anchor_recall, fit_anchors,
    format_anchor_fit, kmeans_aspect_ratios, max_anchor_iou, max_anchor_iou_exhaustive,
)
from densekit.modeling.build import config_dir, load_model_config


def bars(n: int = 600, size: int = 256, aspect: float = 6.0, seed: int = 0) -> np.ndarray:
    """``n`` boxes of about 1:``aspect`` (half wide, half tall), long side 70-220 px, in a ``size`` square input."""
    rng = np.random.default_rng(seed)
    long = np.exp(rng.uniform(np.log(70), np.log(220), n))
    short = long / (aspect * rng.uniform(0.9, 1.1, n))
    wide = rng.random(n) < 0.5
    w, h = np.where(wide, long, short), np.where(wide, short, long)
    x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
    return np.stack([x, y, x + w, y + h], 1)


def as_coco(boxes: np.ndarray, side: int = 256) -> dict:
    """One ``side`` square image per box, for the functions that read a COCO dict."""
    images = [{"id": i, "height": side, "width": side, "file_name": f"{i}.png"} for i in range(len(boxes))]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0}
            for i, (x0, y0, x1, y1) in enumerate(boxes.tolist())]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "bar"}]}


@pytest.fixture(scope="module")
def lite0():
    return load_model_config("efficientdet_lite0")


@pytest.mark.parametrize("size, setting", [
    (320, AnchorSetting(((1.0, 1.0), (1.4, 0.7), (0.7, 1.4)), 3.0, 3)),
    (300, AnchorSetting(((0.41, 2.45), (2.45, 0.41)), 2.5, 4)),  # padded to 320: levels of odd sizes
])
def test_the_nearest_cell_is_the_exhaustive_maximum(lite0, size: int, setting: AnchorSetting) -> None:
    rng = np.random.default_rng(1)
    xy = rng.uniform(-10, size, (300, 2))
    wh = np.exp(rng.uniform(np.log(4), np.log(size), (300, 2)))
    boxes = np.concatenate([xy, xy + wh], 1)
    geometry = AnchorGeometry.of(lite0, size)
    assert geometry.input_size == (-(-size // 32) * 32,) * 2
    fast = max_anchor_iou(boxes, setting, geometry)
    assert fast == pytest.approx(max_anchor_iou_exhaustive(boxes, setting, geometry), abs=1e-5)
    assert 0.05 < (fast >= 0.5).mean() < 1  # a meaningful mix of matched and unmatched boxes


def test_boxes_at_the_input_size_as_the_train_transform_scales_them() -> None:
    coco = {
        "images": [{"id": 1, "height": 100, "width": 200}, {"id": 2, "height": 400, "width": 100}],
        "annotations": [
            {"image_id": 1, "bbox": [20, 10, 40, 30]},
            {"image_id": 1, "bbox": [190, 0, 40, 10]},  # partly outside: clipped
            {"image_id": 1, "bbox": [300, 0, 40, 10]},  # wholly outside: dropped
            {"image_id": 2, "bbox": [0, 0, 0, 10]},  # zero width: dropped
            {"image_id": 2, "bbox": [10, 40, 20, 80], "iscrowd": 1},  # crowd: not a box to match
            {"image_id": 2, "bbox": [10, 40, 20, 80]},
        ],
    }
    boxes = boxes_at_input_size(coco, 100)
    assert boxes.tolist() == [[10, 5, 30, 20], [95, 0, 100, 5], [2.5, 10, 7.5, 30]]
    assert len(boxes_at_input_size(as_coco(bars(50)), 256, max_boxes=20)) == 20


def test_elongated_boxes_default_recall_low_fitted_high(lite0) -> None:
    boxes = bars()
    (tall, wide) = kmeans_aspect_ratios(boxes, 2)  # (w, h) multipliers of w * h = 1
    assert tall[1] / tall[0] == pytest.approx(6, rel=0.03) and wide[0] / wide[1] == pytest.approx(6, rel=0.03)
    fit = fit_anchors(boxes, lite0, 256)
    assert fit.current.recall < 0.5  # the 2:1 anchors of the defaults reach no 1:6 box at IoU 0.5
    best = fit.recommended
    assert best is not None and best.recall >= 0.95
    geometry = AnchorGeometry.of(lite0, 256)
    assert max_anchor_iou_exhaustive(boxes, best.setting, geometry).__ge__(0.5).mean() == pytest.approx(best.recall)
    # Every step reports its recall; the overrides printed compose onto the model config as they are.
    text = "\n".join(format_anchor_fit(fit))
    assert f"recall {fit.current.recall:.3f}" in text and f"recall {best.recall:.3f}" in text
    assert "'model.anchors.aspect_ratios=[[" in text
    register_configs()
    with initialize_config_dir(str(config_dir()), version_base=None):
        cfg = compose("train", overrides=["model=efficientdet_lite0", *best.setting.overrides()])
    assert AnchorSetting.of(cfg.model.anchors) == best.setting
    assert anchor_recall(boxes, AnchorSetting.of(cfg.model.anchors), geometry) == best.recall


def test_square_boxes_need_no_other_anchors(lite0) -> None:
    rng = np.random.default_rng(2)
    side = np.exp(rng.uniform(np.log(40), np.log(200), 400))
    xy = rng.uniform(0, 256 - side[:, None], (400, 2))
    fit = fit_anchors(np.concatenate([xy, xy + side[:, None]], 1), lite0, 256)
    assert fit.current.recall >= WARN_BELOW


def _run_cfg(model) -> OmegaConf:
    return OmegaConf.create({"model": OmegaConf.to_container(model), "data": {"image_size": 256}})


def test_train_warns_below_the_threshold_naming_the_inspect_command(lite0, caplog: pytest.LogCaptureFixture) -> None:
    dataset = SimpleNamespace(coco=SimpleNamespace(dataset=as_coco(bars(3000))))
    with caplog.at_level(logging.WARNING, logger="densekit.modeling.anchor_fit"):
        recall = check_anchor_recall(_run_cfg(lite0), dataset, ("python", "tools/inspect_dataset.py"))
    assert recall is not None and recall < WARN_BELOW
    (record,) = caplog.records
    assert f"anchor recall {recall:.2f}" in record.message and "of 2000 training boxes" in record.message
    assert record.message.endswith("run: python tools/inspect_dataset.py")

    caplog.clear()
    square = bars(200, aspect=1.0)
    with caplog.at_level(logging.WARNING, logger="densekit.modeling.anchor_fit"):
        assert check_anchor_recall(_run_cfg(lite0), SimpleNamespace(coco=SimpleNamespace(dataset=as_coco(square))),
                                   ("densekit", "inspect")) >= WARN_BELOW
    assert not caplog.records
    segmenter = _run_cfg(load_model_config("eseg_lite_s"))
    assert check_anchor_recall(segmenter, SimpleNamespace(), ("densekit", "inspect")) is None
