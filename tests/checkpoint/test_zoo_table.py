"""The zoo table against its sources: effdet's model configs and README, torchvision's weight metadata; and every
entry's model config, built with the entry's keys, takes the published architecture's state_dict (shapes on the
meta device, no download)."""
from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import torch
from torch.hub import HASH_REGEX

effdet = pytest.importorskip("effdet")
from effdet import EfficientDet as EffDet, get_efficientdet_config  # noqa: E402
from torchvision.models.segmentation import LRASPP_MobileNet_V3_Large_Weights, lraspp_mobilenet_v3_large  # noqa: E402

import densekit  # noqa: E402
from densekit.checkpoint import zoo  # noqa: E402
from densekit.checkpoint.convert import load_state_dict_any  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EFFDET = [name for name, entry in zoo.ZOO.items() if entry.layout == "effdet"]
LRASPP = LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1


def test_the_zoo_covers_the_published_checkpoints() -> None:
    expected = {f"tf_efficientdet_d{i}" for i in range(8)} | {"tf_efficientdet_d7x", "efficientdet_d0", "efficientdet_d1"}
    expected |= {f"tf_efficientdet_lite{i}" for i in range(5)} | {f"tf_efficientdet_d{i}_ap" for i in range(6)}
    assert set(EFFDET) == expected
    assert {e.layout for e in zoo.ZOO.values()} == {"effdet", "torchvision_lraspp"}


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_entry_names_a_model_config_and_its_file_hash(name: str) -> None:
    entry = zoo.ZOO[name]
    assert entry.model in densekit.list_models()
    assert HASH_REGEX.search(entry.filename).group(1) == entry.sha256  # as torch.hub reads it off the file name
    assert entry.url.startswith("https://")


@pytest.mark.parametrize("name", EFFDET)
def test_effdet_entry_matches_effdet_and_its_readme(name: str) -> None:
    entry, cfg = zoo.ZOO[name], get_efficientdet_config(name)
    assert entry.url == cfg.url
    assert entry.image_size == "x".join(map(str, cfg.image_size))
    model_cfg = densekit.load_model_config(entry.model, **entry.model_overrides())
    assert list(model_cfg.image_size) == list(cfg.image_size)
    # densekit's Lite configs use TF's (x - 127) / 128; effdet rounds it to 0.5 / 0.5.
    assert model_cfg.pixel_mean == pytest.approx(list(cfg.get("mean", (0.485, 0.456, 0.406))), abs=2.5e-3)
    assert model_cfg.pixel_std == pytest.approx(list(cfg.get("std", (0.229, 0.224, 0.225))), abs=2.5e-3)
    readme = importlib.metadata.distribution("effdet").read_text("METADATA")
    row = re.search(rf"^\| {name} +\| +([\d.]+) +\|", readme, re.M)
    assert row and entry.metric == f"{row[1]} AP", f"{name}: effdet README says {row and row[1]}"


@pytest.mark.parametrize("name", EFFDET)
def test_effdet_entry_model_takes_the_published_state_dict(name: str) -> None:
    entry = zoo.ZOO[name]
    with torch.device("meta"):
        ref = EffDet(get_efficientdet_config(name), pretrained_backbone=False)
        ours = densekit.create_model(entry.model, **entry.model_overrides())
    load_state_dict_any(ours, ref.state_dict(), name)  # raises with the bad keys if any key or shape differs
    assert ours.num_classes == 90 and len(ours.config.class_names) == 90


def test_lraspp_entry_matches_torchvision() -> None:
    entry = zoo.ZOO["lraspp_mobilenet_v3_large_coco_voc"]
    assert entry.url == LRASPP.url and entry.class_names() == LRASPP.meta["categories"]
    assert entry.metric == f"{LRASPP.meta['_metrics']['COCO-val2017-VOC-labels']['miou']} mIoU"
    assert entry.image_size == f"short side {LRASPP.transforms().resize_size[0]}"
    with torch.device("meta"):
        ref = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
        ours = densekit.create_model(entry.model, **entry.model_overrides())
    load_state_dict_any(ours, ref.state_dict(), entry.name)
    assert ours.num_classes == 21


def test_docs_table_is_the_zoo_table() -> None:
    docs = (ROOT / "docs" / "models.md").read_text()
    section = docs[docs.index("## Pretrained weights"):]
    assert zoo.markdown_table() in section, "regenerate it with densekit.checkpoint.zoo.markdown_table()"
