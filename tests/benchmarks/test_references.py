"""benchmarks/references.py: the twins compute what the densekit model computes (they share its weights), and
effdet's names and target format."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("effdet")

import densekit  # noqa: E402
from densekit.benchmarks.references import (  # noqa: E402
    NoReferenceError,
    effdet_counterpart,
    effdet_targets,
    effdet_train_twin,
    reference_twin,
)


def test_effdet_counterpart_names() -> None:
    assert effdet_counterpart("efficientdet_d0") == "tf_efficientdet_d0"
    assert effdet_counterpart("efficientdet_lite4") == "tf_efficientdet_lite4"
    assert effdet_counterpart("eseg_lite_s") is None


@pytest.mark.parametrize("name,size", [("efficientdet_lite0", (128, 128)), ("lraspp_mobilenet_v3_large", (64, 128))])
def test_the_twin_network_computes_the_densekit_network(name: str, size: tuple[int, int]) -> None:
    model = densekit.create_model(name).eval()
    ref = reference_twin(model, size, batch=1)
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.forward_raw(x)  # normalises inside
        theirs = ref.network((x - model.pixel_mean) / model.pixel_std)
    if isinstance(ours, torch.Tensor):  # segmenter logits
        ours, theirs = [ours], [theirs]
    else:  # detector: (class outputs per level, box outputs per level)
        ours, theirs = [*ours[0], *ours[1]], [*theirs[0], *theirs[1]]
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_training_twin_and_its_targets() -> None:
    model = densekit.create_model("efficientdet_lite0")
    bench, name = effdet_train_twin(model, (128, 128))
    assert name == "tf_efficientdet_lite0" and bench.training
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([0])}] * 2
    converted = effdet_targets(targets)
    assert converted["bbox"].tolist() == [[[2.0, 1.0, 40.0, 30.0]]] * 2  # yxyx
    assert converted["cls"].tolist() == [[1.0]] * 2  # 1-based
    loss = bench(torch.zeros(2, 3, 128, 128), converted)["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_an_architecture_override_has_no_twin() -> None:
    with pytest.raises(NoReferenceError, match="not the same model"):
        effdet_train_twin(densekit.create_model("efficientdet_lite0", neck={"channels": 32}), (128, 128))
