"""One's own segmentation data: image folder + label PNG folder + class list (mmseg / ADE20K custom layout)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from densekit.data.seg_folder import SegmentationFolder, read_class_names


def test_pairs_images_and_labels_in_sub_folders(custom_seg) -> None:
    root = custom_seg["root"]
    names = read_class_names(custom_seg["classes"])
    ds = SegmentationFolder(root / "images" / "train", root / "labels" / "train", names)
    assert names == ["ground", "block", "disc"] and len(ds) == 6
    image, target = ds[1]
    raw = cv2.imread(target["label_file"], cv2.IMREAD_UNCHANGED)
    assert Path(target["label_file"]).relative_to(root / "labels" / "train").parent.name in {"a", "b"}
    assert image.shape[-2:] == raw.shape and (target["sem_seg"].numpy() == raw).all()
    assert target["name"] == str(Path(target["file"]).relative_to(root / "images" / "train").with_suffix(".png"))
    assert ds.label_ids.tolist() == [0, 1, 2]


def test_reduce_zero_label_and_another_ignore_value(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir(), (tmp_path / "ann").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "x.jpg"), np.zeros((4, 4, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "ann" / "x.png"), np.array([[0, 1, 2, 3]] * 4, np.uint8))
    ade = SegmentationFolder(tmp_path / "img", tmp_path / "ann", ["wall", "floor", "sky"], reduce_zero_label=True)
    assert ade.load_label(0)[0].tolist() == [255, 0, 1, 2] and ade.label_ids.tolist() == [1, 2, 3]
    other = SegmentationFolder(tmp_path / "img", tmp_path / "ann", ["a", "b", "c"], ignore_index=3)
    assert other.load_label(0)[0].tolist() == [0, 1, 2, 255]


def test_bad_values_missing_labels_and_bad_class_lists_are_named(tmp_path: Path) -> None:
    (tmp_path / "img" / "s").mkdir(parents=True), (tmp_path / "ann" / "s").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "img" / "s" / "x.jpg"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"ann/s/x\.png"):
        SegmentationFolder(tmp_path / "img", tmp_path / "ann", ["a", "b"])
    cv2.imwrite(str(tmp_path / "ann" / "s" / "x.png"), np.full((4, 4), 7, np.uint8))
    ds = SegmentationFolder(tmp_path / "img", tmp_path / "ann", ["a", "b"])
    with pytest.raises(ValueError, match=r"x\.png has values \[7\]"):
        ds[0]
    with pytest.raises(ValueError, match="repeats"):
        read_class_names(["a", "a"])
    with pytest.raises(FileNotFoundError, match="one class name per line"):
        read_class_names(tmp_path / "nope.txt")
