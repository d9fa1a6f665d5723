"""densekit.modeling.model_spec: the one path from a config and ``weights=`` to a ready model."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import densekit
from densekit.checkpoint import io as checkpoint_io
from densekit.checkpoint import zoo
from densekit.config import register_configs
from densekit.modeling.build import config_dir
from densekit.modeling.model_spec import finish_run_config, model_spec
from densekit.tasks import get_task

TINY = {"neck": {"channels": 16, "repeats": 1}, "head": {"repeats": 1}}
ADVPROP = {"pixel_mean": [0.5, 0.5, 0.5], "pixel_std": [0.5, 0.5, 0.5]}  # the _ap entries' inputs: [-1, 1]


@pytest.fixture
def ap_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A zoo entry like ``tf_efficientdet_d0_ap`` (AdvProp normalisation), served from a file:// URL."""
    model = densekit.create_model("efficientdet_lite0", **TINY)
    served = tmp_path / "served" / "tiny_ap.pth"
    served.parent.mkdir()
    torch.save(model.state_dict(), served)
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    named = served.with_name(f"tiny_ap-{digest[:8]}.pth")
    served.rename(named)
    entry = zoo.ZooEntry(
        name="tiny_ap", url=named.as_uri(), sha256=digest[:8], layout="effdet", model="efficientdet_lite0",
        labels="coco", image_size="320x320", metric="0.0 AP", metric_source="test", arch_overrides={**TINY, **ADVPROP},
    )
    monkeypatch.setitem(zoo.ZOO, "tiny_ap", entry)
    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path / "cache"))
    return "zoo:tiny_ap"


def test_ap_weights_padding_fill_normalises_to_zero(ap_entry: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The tools build their datasets from the finished model config: with the ``_ap`` weights the transform pads
    with their pixel_mean (0.5), which the model normalises to zero (it padded with ImageNet's mean before)."""
    monkeypatch.setenv("DENSEKIT_DATASETS", str(tmp_path / "datasets"))
    register_configs()  # the model schemas the YAMLs' defaults lists name, as the tools register them
    with initialize_config_dir(str(config_dir()), version_base=None):
        cfg = compose("eval", overrides=["model=efficientdet_lite0", f"weights={ap_entry}", "data.num_train=2",
                                         "data.num_val=2", "data.image_size=64"])
    spec = finish_run_config(cfg)
    assert list(cfg.model.pixel_mean) == [0.5, 0.5, 0.5]
    dataset = get_task(cfg).build_dataset(cfg, cfg.data.split, train=False)
    image, _ = dataset[0]
    model = spec.build().eval()
    # A wide image letterboxed to 64x64: the bottom rows are padding.
    normalised = model.normalize_and_pad(image[None])
    padding = normalised[0, :, -1, :]
    assert image.shape[-2:] == (64, 64)
    assert torch.allclose(image[:, -1, :], torch.tensor(128 / 255))  # the padded row: round(255 * 0.5)
    assert padding.abs().max().item() <= 1 / 255 / 0.5 + 1e-6, padding.abs().max()


def test_weights_are_read_once_and_classes_from_a_dataset_fine_tune(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run = densekit.create_model("efficientdet_lite0", num_classes=3, class_names=["cat", "dog", "fox"], **TINY)
    path = tmp_path / "run.pth"
    torch.save({"model": run.state_dict(), "config": {"model": {"num_classes": 3, "class_names": ["cat", "dog", "fox"]}}},
               path)
    reads = []
    real = checkpoint_io.read_checkpoint
    monkeypatch.setattr("densekit.checkpoint.weights.read_checkpoint", lambda p: reads.append(p) or real(p))

    spec = model_spec("efficientdet_lite0", path, **TINY)
    assert spec.config.num_classes == 3 and list(spec.config.class_names) == ["cat", "dog", "fox"]
    same = spec.build()  # all-or-nothing: the run's classes
    assert torch.equal(same.head.class_net.predict.conv_pw.weight, run.head.class_net.predict.conv_pw.weight)

    tuned = spec.with_classes(2, ["dog", "cow"]).build()  # a dataset's classes: the class predictor fine-tunes
    assert tuned.config.num_classes == 2 and list(tuned.config.class_names) == ["dog", "cow"]
    assert torch.equal(tuned.backbone.body.conv_stem.weight, run.backbone.body.conv_stem.weight)
    assert len(reads) == 1  # one read for the spec, however many models it builds


def test_an_artifact_refuses_overrides(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from densekit.deploy.formats import export_artifact

    model = densekit.create_model("lraspp_mobilenet_v3_small", num_classes=4).eval()
    path = export_artifact(model, "onnx", tmp_path / "seg.onnx", (64, 64))
    spec = model_spec("lraspp_mobilenet_v3_small", path)
    assert spec.config.num_classes == 4 and "artifact" in spec.description
    with pytest.raises(ValueError, match="exported artifact: its config is fixed at export"):
        model_spec("lraspp_mobilenet_v3_small", path, num_classes=5)
    assert np.isfinite(spec.build().predict_labels(torch.rand(1, 3, 64, 64)).numpy()).all()
