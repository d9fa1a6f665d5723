"""Segmentation datasets decode images in the frame their EXIF orientation declares, as detection does
(``data.exif_orientation``, default true); label PNGs are read as stored. A label drawn in the image's other frame is
refused naming EXIF and the switch, which then loads it aligned."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from densekit.data.seg_folder import SegmentationFolder
from densekit.tasks import segmentation as seg_task

CONF = Path(__file__).resolve().parents[2] / "conf"
CLASSES = ["background", "thing"]
STORED = (60, 80)  # (H, W) of the pixels in the file; EXIF orientation 6 displays them 80x60


def _stored_pixels() -> tuple[np.ndarray, np.ndarray]:
    """A dark photo with a bright block in its top-left part, and its label (1 on the block), in the stored frame."""
    label = np.zeros(STORED, np.uint8)
    label[5:25, 10:40] = 1
    image = np.where(label[..., None] == 1, 230, 20).astype(np.uint8).repeat(3, axis=2)
    return image, label


@pytest.fixture()
def phone(tmp_path: Path) -> Path:
    """``images/p.jpg`` stored sideways with EXIF orientation 6 (displayed = stored turned 90 degrees clockwise), and
    its label drawn in either frame: ``displayed/p.png`` and ``stored/p.png``."""
    image, label = _stored_pixels()
    for folder in ("images", "displayed", "stored"):
        (tmp_path / folder).mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(image).save(tmp_path / "images" / "p.jpg", quality=95, exif=exif)
    cv2.imwrite(str(tmp_path / "stored" / "p.png"), label)
    cv2.imwrite(str(tmp_path / "displayed" / "p.png"), np.ascontiguousarray(np.rot90(label, -1)))
    return tmp_path


def _assert_aligned(image: Any, sem_seg: Any, size: tuple[int, int]) -> None:
    """The bright block and the label's class 1 cover the same pixels."""
    gray = image.numpy().mean(axis=0)
    labels = sem_seg.numpy()
    assert gray.shape == labels.shape == size
    assert gray[labels == 1].mean() > 0.8 and gray[labels == 0].mean() < 0.2


def test_label_in_the_displayed_frame_loads_aligned(phone: Path) -> None:
    image, target = SegmentationFolder(phone / "images", phone / "displayed", CLASSES)[0]
    assert target["orig_size"] == STORED[::-1]
    _assert_aligned(image, target["sem_seg"], STORED[::-1])


def test_label_in_the_stored_frame_names_exif_and_the_switch(phone: Path) -> None:
    with pytest.raises(ValueError) as caught:
        SegmentationFolder(phone / "images", phone / "stored", CLASSES)[0]
    message = str(caught.value)
    assert str(phone / "stored" / "p.png") in message and str(phone / "images" / "p.jpg") in message
    assert "is 60x80 (HxW) but its image" in message and "is 80x60" in message
    assert ("its EXIF orientation rotates it: the label describes the stored frame; if the label was drawn on it, "
            "set data.exif_orientation=false") in message
    image, target = SegmentationFolder(phone / "images", phone / "stored", CLASSES, exif=False)[0]
    assert target["orig_size"] == STORED
    _assert_aligned(image, target["sem_seg"], STORED)


def test_stored_frame_switch_with_a_displayed_label_says_to_turn_it_back_on(phone: Path) -> None:
    with pytest.raises(ValueError, match=r"the label describes the displayed frame; set data\.exif_orientation=true"):
        SegmentationFolder(phone / "images", phone / "displayed", CLASSES, exif=False)[0]


def test_a_plain_size_mismatch_does_not_mention_exif(tmp_path: Path) -> None:
    """An image without EXIF whose label happens to be its transpose: a wrong label, not an orientation."""
    (tmp_path / "img").mkdir(), (tmp_path / "ann").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "x.jpg"), np.zeros((6, 8, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "ann" / "x.png"), np.zeros((8, 6), np.uint8))
    with pytest.raises(ValueError, match=r"ann/x\.png is 8x6 \(HxW\) but its image .*x\.jpg is 6x8$"):
        SegmentationFolder(tmp_path / "img", tmp_path / "ann", CLASSES)[0]


def _data_config(name: str, *overrides: str) -> Any:
    """``conf/data/<name>.yaml`` as Hydra composes it (its defaults included), with ``overrides``."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(overrides=[f"+data={name}", *overrides]).data


@pytest.mark.parametrize("name", ["custom_seg", "cityscapes", "synthetic_cityscapes"])
def test_segmentation_data_configs_have_the_switch(name: str) -> None:
    assert _data_config(name).exif_orientation is True


def test_the_switch_reaches_the_datasets(phone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _data_config("custom_seg", "data.exif_orientation=false", f"data.val_images={phone / 'images'}",
                        f"data.val_labels={phone / 'stored'}", f"data.classes=[{','.join(CLASSES)}]")
    dataset = seg_task.build_seg_folder_dataset(data, "val", train=False)
    assert dataset.exif is False
    image, target = dataset[0]
    _assert_aligned(image, target["sem_seg"], STORED)

    built: dict[str, Any] = {}
    monkeypatch.setattr(seg_task, "CityscapesSegmentation", lambda *args, **kwargs: built.update(kwargs))
    seg_task.build_cityscapes_dataset(_data_config("cityscapes", "data.exif_orientation=false"), "val", train=False)
    assert built["exif"] is False
