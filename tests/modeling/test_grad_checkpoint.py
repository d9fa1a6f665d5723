"""model.grad_checkpoint: the same losses, gradients and BatchNorm statistics as without, and less kept for backward."""
from __future__ import annotations

import copy

import pytest
import torch

import densekit

DET = ("efficientdet_d0", dict(num_classes=3, image_size=[128, 128], neck={"repeats": 2, "channels": 16}, head={"repeats": 1}))
SEG = ("lraspp_mobilenet_v3_small", dict(num_classes=4, image_size=[64, 96]))


def batch(name: str) -> tuple[torch.Tensor, object]:
    g = torch.Generator().manual_seed(0)
    if name.startswith("efficientdet"):
        images = torch.rand(2, 3, 128, 128, generator=g)
        boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 120.0, 100.0]])
        targets = [{"boxes": boxes, "labels": torch.tensor([0, 2])}, {"boxes": boxes[:1] + 5, "labels": torch.tensor([1])}]
        return images, targets
    images = torch.rand(2, 3, 64, 96, generator=g)
    labels = torch.randint(0, 4, (2, 64, 96), generator=g)
    labels[:, :4] = 255  # an ignored band
    return images, [{"sem_seg": label} for label in labels]


def saved_bytes(model: torch.nn.Module, images: torch.Tensor, targets) -> tuple[dict[str, torch.Tensor], int]:
    """The losses, and the bytes autograd keeps for the backward pass of this forward."""
    kept = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = model(images, targets)
    return losses, kept


@pytest.mark.parametrize("name,overrides", [DET, SEG], ids=["efficientdet", "lraspp"])
def test_checkpointed_step_equals_the_plain_one(name: str, overrides: dict, randomise) -> None:
    torch.manual_seed(0)
    plain = densekit.create_model(name, **overrides).train()
    randomise(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()  # checkpoints stay interchangeable
    images, targets = batch(name)

    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same drop-path masks (the recomputation replays the RNG state it started with)
        losses, kept = saved_bytes(model, images, targets)
        sum(losses.values()).backward()
        results.append((losses, kept))
    (plain_losses, plain_kept), (ckpt_losses, ckpt_kept) = results
    assert ckpt_kept < 0.7 * plain_kept, (ckpt_kept, plain_kept)  # activations are recomputed, not kept
    for key in plain_losses:
        torch.testing.assert_close(ckpt_losses[key], plain_losses[key], rtol=1e-5, atol=0)
    grads = dict(checkpointed.named_parameters())
    for key, p in plain.named_parameters():
        if p.grad is not None:
            scale = p.grad.abs().max().item() or 1.0
            assert (grads[key].grad - p.grad).abs().max().item() <= 1e-5 * scale, key
    # The recomputation in backward must not update BatchNorm's running statistics a second time.
    ckpt_buffers = dict(checkpointed.named_buffers())
    for key, buffer in plain.named_buffers():
        assert torch.equal(ckpt_buffers[key], buffer), key


def test_grad_checkpoint_config_key_builds_a_checkpointed_model() -> None:
    name, overrides = DET
    model = densekit.create_model(name, grad_checkpoint=True, **overrides)
    assert model.neck.grad_checkpointing and model.train().backbone.body.grad_checkpointing
    assert not densekit.create_model(name, **overrides).neck.grad_checkpointing
    with torch.no_grad():  # evaluation and inference never recompute: the outputs are the plain model's
        out = model.eval()(torch.rand(1, 3, 128, 128))
    assert not model.backbone.body.grad_checkpointing  # timm's flag follows train / eval
    assert set(out[0]) >= {"boxes", "scores", "labels"}
