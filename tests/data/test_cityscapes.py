"""Cityscapes loading: a tiny real-layout dataset made with cityscapesscripts, transforms, and every bad input.

The dataset is the synthetic generator's output: real label names in ``*_gtFine_polygons.json``, rasterised to
labelIds by cityscapesscripts and converted to trainIds by its ``createTrainIdLabelImgs``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import id2label
from cityscapesscripts.preparation import createTrainIdLabelImgs

from densekit.data.cityscapes import CITYSCAPES_CLASSES, CityscapesSegmentation, label_id_to_train_id
from densekit.data.seg_transforms import build_seg_eval_transform, build_seg_train_transform
from densekit.data.synthetic_cityscapes import ensure_synthetic_cityscapes

SMALL = dict(num_train=3, num_val=2, size=(64, 128))
H, W = SMALL["size"]


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic_cityscapes(tmp_path_factory.mktemp("cityscapes"), **SMALL)


@pytest.fixture
def cs_copy(cs_root: Path, tmp_path: Path) -> Path:
    """A private copy to break."""
    return Path(shutil.copytree(cs_root, tmp_path / "cityscapes"))


def _official_train_ids(label_ids: np.ndarray) -> np.ndarray:
    lut = np.full(256, 255, np.int64)
    for i, lb in id2label.items():
        if i >= 0:
            lut[i] = lb.trainId if lb.trainId >= 0 else 255
    return lut[label_ids]


def test_items_have_shapes_and_trainids(cs_root: Path) -> None:
    ds = CityscapesSegmentation(cs_root, "train")
    assert len(ds) == 3 and len(CITYSCAPES_CLASSES) == 19
    seen = set()
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, H, W)
        assert 0.0 <= image.min() and image.max() <= 1.0
        sem = target["sem_seg"]
        assert sem.dtype == torch.int64 and sem.shape == (H, W)
        assert target["orig_size"] == (H, W) and target["size"] == (H, W)
        assert target["file"].endswith("_leftImg8bit.png") and Path(target["file"]).is_file()
        assert target["label_file"].endswith("_gtFine_labelTrainIds.png")
        label_ids = cv2.imread(target["label_file"].replace("labelTrainIds", "labelIds"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(sem.numpy(), _official_train_ids(label_ids))
        seen |= set(sem.unique().tolist())
    assert seen <= set(range(19)) | {255}
    assert {0, 1, 2, 10, 13, 255} <= seen  # road, sidewalk, building, sky, car, and ignored pixels
    assert (label_id_to_train_id()[[7, 8, 26, 0, 4]] == [0, 1, 13, 255, 255]).all()


def test_train_transform_crops_pads_with_ignore_and_keeps_ids(cs_root: Path) -> None:
    transform = build_seg_train_transform(crop_size=(96, 160), scale_range=(0.5, 0.75), color_jitter=True)
    ds = CityscapesSegmentation(cs_root, "train", transform=transform)
    raw = CityscapesSegmentation(cs_root, "train")
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 96, 160) and target["sem_seg"].shape == (96, 160)
        assert target["size"] == (96, 160) and target["orig_size"] == (H, W)
        # At most 0.75 * 64 x 0.75 * 128 image pixels fit: the rest is padding, labelled ignore.
        assert (target["sem_seg"] == 255).sum() >= 96 * 160 - 48 * 96
        # Nearest only: no value that was not in the source label.
        assert set(target["sem_seg"].unique().tolist()) <= set(raw[i][1]["sem_seg"].unique().tolist()) | {255}


def test_train_transform_is_seedable_and_label_nearest() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    label = np.where(rng.random((40, 70)) < 0.5, 3, 200).astype(np.uint8)
    transform = build_seg_train_transform(crop_size=(32, 48), scale_range=(0.6, 1.9))
    outs = []
    for _ in range(2):
        transform.set_random_seed(7)
        outs.append([transform(image, label) for _ in range(4)])
    for (img_a, lab_a), (img_b, lab_b) in zip(*outs):
        assert torch.equal(img_a, img_b) and torch.equal(lab_a, lab_b)
        assert set(lab_a.unique().tolist()) <= {3, 200, 255}


def test_eval_transform_identity_and_resize(cs_root: Path) -> None:
    raw = CityscapesSegmentation(cs_root, "val")
    image, target = CityscapesSegmentation(cs_root, "val", transform=build_seg_eval_transform())[0]
    assert torch.equal(image, raw[0][0]) and torch.equal(target["sem_seg"], raw[0][1]["sem_seg"])
    # Resized input, label kept at full resolution for the evaluator.
    image, target = CityscapesSegmentation(cs_root, "val", transform=build_seg_eval_transform((32, 64)))[0]
    assert image.shape == (3, 32, 64) and target["size"] == (32, 64)
    assert torch.equal(target["sem_seg"], raw[0][1]["sem_seg"])
    _, target = CityscapesSegmentation(cs_root, "val", transform=build_seg_eval_transform((32, 64), True))[0]
    assert target["sem_seg"].shape == (32, 64)
    assert set(target["sem_seg"].unique().tolist()) <= set(raw[0][1]["sem_seg"].unique().tolist())


def test_test_split_needs_no_labels(cs_copy: Path) -> None:
    src = next((cs_copy / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))
    dst = cs_copy / "leftImg8bit" / "test" / "berlin" / "berlin_000000_000019_leftImg8bit.png"
    dst.parent.mkdir(parents=True)
    shutil.copy(src, dst)
    image, target = CityscapesSegmentation(cs_copy, "test", transform=build_seg_eval_transform())[0]
    assert image.shape == (3, H, W) and target["sem_seg"] is None and target["label_file"] is None
    assert target["file"] == str(dst)


# ---------------------------------------------------------------------------------------------------- bad inputs


def _first(root: Path, kind: str) -> Path:
    folder = "leftImg8bit" if kind == "leftImg8bit" else "gtFine"
    return sorted((root / folder / "train").glob(f"*/*_{kind}.png"))[0]


def test_missing_root_says_where_data_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DENSEKIT_DATASETS", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="DENSEKIT_DATASETS") as e:
        CityscapesSegmentation(split="val")
    assert "datasets/README.md" in str(e.value) and str(tmp_path / "nowhere" / "cityscapes") in str(e.value)
    with pytest.raises(ValueError, match="split"):
        CityscapesSegmentation(tmp_path, "training")


def test_missing_gtfine_file_is_named(cs_copy: Path) -> None:
    train_ids = _first(cs_copy, "gtFine_labelTrainIds")
    train_ids.unlink()
    Path(str(train_ids).replace("labelTrainIds", "labelIds")).unlink()
    with pytest.raises(FileNotFoundError, match="no gtFine label") as e:
        CityscapesSegmentation(cs_copy, "train")
    assert str(train_ids) in str(e.value)


def test_missing_trainids_says_to_run_cityscapesscripts(cs_copy: Path) -> None:
    train_ids = _first(cs_copy, "gtFine_labelTrainIds")
    train_ids.unlink()
    with pytest.raises(FileNotFoundError, match="csCreateTrainIdLabelImgs") as e:
        CityscapesSegmentation(cs_copy, "train")
    assert f"CITYSCAPES_DATASET={cs_copy}" in str(e.value) and str(train_ids) in str(e.value)


def test_label_size_mismatch_is_named(cs_copy: Path) -> None:
    train_ids = _first(cs_copy, "gtFine_labelTrainIds")
    cv2.imwrite(str(train_ids), np.zeros((H // 2, W), np.uint8))
    ds = CityscapesSegmentation(cs_copy, "train")
    with pytest.raises(ValueError, match="HxW") as e:
        ds[0]
    assert str(train_ids) in str(e.value) and str(_first(cs_copy, "leftImg8bit")) in str(e.value)


@pytest.mark.parametrize("bad_value", [19, 26, 254])
def test_unexpected_label_ids_are_named(cs_copy: Path, bad_value: int) -> None:
    train_ids = _first(cs_copy, "gtFine_labelTrainIds")
    label = cv2.imread(str(train_ids), cv2.IMREAD_UNCHANGED)
    label[5:9, 10:20] = bad_value
    cv2.imwrite(str(train_ids), label)
    with pytest.raises(ValueError, match=rf"40 pixels with values \[{bad_value}\]") as e:
        CityscapesSegmentation(cs_copy, "train")[0]
    assert str(train_ids) in str(e.value)


def test_labelids_file_passed_as_trainids_is_caught(cs_copy: Path) -> None:
    train_ids = _first(cs_copy, "gtFine_labelTrainIds")
    shutil.copy(str(train_ids).replace("labelTrainIds", "labelIds"), train_ids)
    with pytest.raises(ValueError, match="looks like a labelIds file"):
        CityscapesSegmentation(cs_copy, "train")[0]


@pytest.mark.parametrize("kind", ["leftImg8bit", "gtFine_labelTrainIds"])
def test_undecodable_files_are_named(cs_copy: Path, kind: str) -> None:
    path = _first(cs_copy, kind)
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(OSError, match="cannot decode") as e:
        CityscapesSegmentation(cs_copy, "train")[0]
    assert str(path) in str(e.value)


def test_colour_label_is_rejected(cs_copy: Path) -> None:
    path = _first(cs_copy, "gtFine_labelTrainIds")
    cv2.imwrite(str(path), np.zeros((H, W, 3), np.uint8))
    with pytest.raises(OSError, match="single-channel") as e:
        CityscapesSegmentation(cs_copy, "train")[0]
    assert str(path) in str(e.value)


# ---------------------------------------------------------------------------------------------- synthetic data


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_is_deterministic_and_idempotent(cs_root: Path, tmp_path: Path) -> None:
    again = _files(ensure_synthetic_cityscapes(tmp_path / "again", **SMALL))
    assert again == _files(cs_root)
    assert sum(k.endswith("_leftImg8bit.png") for k in again) == 5
    other = _files(ensure_synthetic_cityscapes(tmp_path / "other", **{**SMALL, "seed": 1}))
    assert other.keys() == again.keys() and other != again
    # A second call with the same settings touches nothing; fewer images removes the extra ones.
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "again").rglob("*.png")}
    ensure_synthetic_cityscapes(tmp_path / "again", **SMALL)
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "again").rglob("*.png")}
    ensure_synthetic_cityscapes(tmp_path / "again", **{**SMALL, "num_train": 1})
    assert len(list((tmp_path / "again" / "leftImg8bit" / "train").glob("*/*.png"))) == 1
    assert len(list((tmp_path / "again" / "gtFine" / "train").glob("*/*"))) == 4


def test_synthetic_trainids_come_from_cityscapesscripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = createTrainIdLabelImgs.json2labelImg

    def spy(src: str, dst: str, encoding: str = "ids") -> None:
        calls.append((Path(src).name, Path(dst).name, encoding))
        original(src, dst, encoding)

    monkeypatch.setattr(createTrainIdLabelImgs, "json2labelImg", spy)
    root = ensure_synthetic_cityscapes(tmp_path / "cs", **SMALL)
    polygons = sorted(root.glob("gtFine/*/*/*_gtFine_polygons.json"))
    assert len(polygons) == 5
    assert sorted(calls) == sorted(
        (p.name, p.name.replace("_polygons.json", "_labelTrainIds.png"), "trainIds") for p in polygons
    )
    all_ids = set()
    for p in polygons:
        label_ids = cv2.imread(str(p).replace("_polygons.json", "_labelIds.png"), cv2.IMREAD_UNCHANGED)
        train_ids = cv2.imread(str(p).replace("_polygons.json", "_labelTrainIds.png"), cv2.IMREAD_UNCHANGED)
        instance_ids = cv2.imread(str(p).replace("_polygons.json", "_instanceIds.png"), cv2.IMREAD_UNCHANGED)
        assert label_ids.shape == train_ids.shape == instance_ids.shape == (H, W)
        assert instance_ids.dtype == np.uint16
        np.testing.assert_array_equal(train_ids, _official_train_ids(label_ids))
        np.testing.assert_array_equal(np.where(instance_ids >= 1000, instance_ids // 1000, instance_ids), label_ids)
        all_ids |= set(np.unique(label_ids).tolist())
    assert {7, 8, 11, 23, 26} <= all_ids and all_ids & {0, 1, 4}  # real labelIds, some ignored in evaluation
