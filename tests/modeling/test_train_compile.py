"""train.compile's model side (DenseModel.compile_for_training): what compiles, how often, and that it computes the same.

Dynamo is run with a recording backend that executes the captured graphs as they are (no inductor code generation),
so these tests take seconds; the inductor path is tests/engine/test_trainer.py's slow compiled-training test.
"""
from __future__ import annotations

import copy

import torch

import densekit


def _recording_backend(graphs: list[bool]):
    """A dynamo backend that runs each captured graph unchanged and records whether it holds a convolution."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        graphs.append(any("conv" in str(node.target) for node in gm.graph.nodes))
        return gm.forward

    return backend


def _targets(batch: int, boxes: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, boxes, 2, generator=g) * 40
    boxes_xyxy = torch.cat([xy, xy + 8 + torch.rand(batch, boxes, 2, generator=g) * 16], -1)
    return [{"boxes": b, "labels": torch.randint(0, 3, (boxes,), generator=g)} for b in boxes_xyxy]


def test_detector_compiles_its_network_once_whatever_the_box_count_and_computes_the_eager_losses() -> None:
    torch.manual_seed(0)
    eager = densekit.create_model("efficientdet_d0", num_classes=3, image_size=[64, 64], neck={"repeats": 1, "channels": 16},
                                  head={"repeats": 1}).train()
    compiled = copy.deepcopy(eager)
    graphs: list[bool] = []
    torch._dynamo.reset()
    compiled.compile_for_training(backend=_recording_backend(graphs))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for step, boxes in enumerate((2, 5, 3, 7)):  # a different box count every step, as a real loader gives
        targets = _targets(2, boxes, seed=step)
        torch.manual_seed(step)  # the backbone's stochastic depth draws the same on both sides
        want = eager(images, targets)
        torch.manual_seed(step)
        got = compiled(images, targets)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=0)
        sum(got.values()).backward()
    assert graphs.count(True) == 1, "the network recompiled when only the box count changed"
    # The loss compiles for the first box count and once more with a dynamic one; no graph breaks in either.
    assert graphs.count(False) == 2
    assert all(p.grad is not None for p in compiled.head.parameters())
    # Evaluation and copies run eagerly: no new graph, and a copy holds no compiled function of the original.
    compiled.eval()(images)
    copy.deepcopy(compiled).train()(images, _targets(2, 4, seed=9))
    assert len(graphs) == 3


def test_segmenter_compiles_its_network_and_computes_the_eager_loss() -> None:
    torch.manual_seed(0)
    eager = densekit.create_model("lraspp_mobilenet_v3_small", num_classes=4, image_size=[64, 64]).train()
    compiled = copy.deepcopy(eager)
    graphs: list[bool] = []
    torch._dynamo.reset()
    compiled.compile_for_training(backend=_recording_backend(graphs))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    targets = [{"sem_seg": torch.randint(0, 4, (64, 64), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    torch.manual_seed(0)
    want = eager(images, targets)["loss_seg"]
    torch.manual_seed(0)
    torch.testing.assert_close(compiled(images, targets)["loss_seg"], want, rtol=1e-5, atol=0)
    assert graphs == [True]
