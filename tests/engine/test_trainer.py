"""Training engine: resume after interruption, atomic checkpoints, NaN stop, EMA, frozen backbone."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from densekit.checkpoint import train_state as ckpt
from densekit.engine.ema import ModelEMA
from densekit.engine.trainer import Trainer, TrainingDiverged


def test_interrupted_run_resumes_from_last_checkpoint_and_finishes(tmp_path: Path, tiny_model, tiny_loader, train_cfg,
                                                                   interrupt_after) -> None:
    import copy

    fresh = copy.deepcopy(tiny_model)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_model, interrupt_after(tiny_loader, 5), train_cfg, tmp_path, torch.device("cpu")).train()
    saved = ckpt.load_checkpoint(tmp_path / "checkpoints" / "last.pth")
    assert saved["step"] == 4  # checkpoints every 2 steps; step 5 was lost with the interruption

    resumed = Trainer(fresh, tiny_loader, train_cfg, tmp_path, torch.device("cpu"))
    assert resumed.resume_if_possible() and resumed.step == 4
    assert resumed.scheduler.last_epoch == 4  # the lr schedule continues where it stopped
    resumed.train()
    final = ckpt.load_checkpoint(tmp_path / "checkpoints" / "last.pth")
    assert final["step"] == 6 == resumed.total_steps
    assert final["ema"]["updates"] == 6


def test_checkpoint_write_interrupted_mid_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    ckpt.save_checkpoint(tmp_path, {"step": 2, "w": torch.ones(3)})

    def crash_mid_write(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, {"step": 4, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(tmp_path / "last.pth")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]  # no temp file left behind


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path: Path, tiny_model, tiny_loader, train_cfg) -> None:
    original_forward = tiny_model.forward
    calls = {"n": 0}

    def forward(images, targets=None):
        out = original_forward(images, targets)
        calls["n"] += 1
        if calls["n"] == 4:
            out["loss_cls"] = out["loss_cls"] * float("nan")
        return out

    tiny_model.forward = forward
    trainer = Trainer(tiny_model, tiny_loader, train_cfg, tmp_path, torch.device("cpu"))
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3 .*Last good checkpoint: .*last\.pth"):
        trainer.train()
    assert ckpt.load_checkpoint(tmp_path / "checkpoints" / "last.pth")["step"] == 2
    # The stop closed what the hooks opened: the progress bar ended, TensorBoard's file writer flushed and closed.
    bars = [h.bar for h in trainer.hooks if type(h).__name__ == "ProgressBar"]
    writers = [h.writer for h in trainer.hooks if type(h).__name__ == "TensorBoardWriter"]
    assert bars and all(bar.disable for bar in bars)  # tqdm.close() disables the bar
    assert writers and all(w.file_writer is None for w in writers)  # SummaryWriter.close() drops its file writer


def test_ema_tracks_the_average_of_the_weights() -> None:
    model = torch.nn.Linear(2, 1)
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    start = ema.module.weight.clone()
    ema.update(model)  # warm-up decay: min(0.5, 2/11) = 2/11
    d = 2 / 11
    torch.testing.assert_close(ema.module.weight, start * d + (1 - d) * torch.ones_like(start))


def test_ema_of_a_tensor_that_does_not_change_stays_bit_exact() -> None:
    """Frozen layers (train.freeze_at) must come out of the EMA as they went in, not drift by rounding."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    with torch.no_grad():
        model[0].weight.mul_(1.7).add_(0.1)  # values with many mantissa bits
    ema = ModelEMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    for _ in range(5):
        ema.update(model)
    assert all(torch.equal(before[k], v) for k, v in ema.module.state_dict().items())


def test_frozen_backbone_does_not_change(tmp_path: Path, tiny_model, tiny_loader, train_cfg) -> None:
    train_cfg.freeze_backbone = True
    train_cfg.max_steps = 2
    before = {k: v.clone() for k, v in tiny_model.backbone.state_dict().items()}
    head_before = tiny_model.head.class_net.predict.conv_pw.weight.clone()
    Trainer(tiny_model, tiny_loader, train_cfg, tmp_path, torch.device("cpu")).train()
    after = tiny_model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert not torch.equal(head_before, tiny_model.head.class_net.predict.conv_pw.weight)


def test_freeze_at_keeps_the_first_backbone_stages_and_trains_the_rest(
    tmp_path: Path, tiny_model, tiny_loader, train_cfg
) -> None:
    train_cfg.freeze_at = 2  # detectron2's default: the stem and the stride-4 stage (EfficientNet blocks.0 and 1)
    train_cfg.max_steps = 2
    body = tiny_model.backbone.body
    frozen_names = ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")
    before = {k: v.clone() for k, v in body.state_dict().items()}
    trainer = Trainer(tiny_model, tiny_loader, train_cfg, tmp_path, torch.device("cpu"))
    trainer.train()
    after = body.state_dict()
    frozen = [k for k in before if k.startswith(frozen_names)]
    assert any("running_mean" in k for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # weights and BN statistics
    assert not torch.equal(before["blocks.2.0.conv_pw.weight"], after["blocks.2.0.conv_pw.weight"])
    assert not any(p.requires_grad for p in body.blocks[1].parameters())
    assert all(p.requires_grad for p in body.blocks[2].parameters())
    train_cfg.freeze_at = -1
    with pytest.raises(ValueError, match="train.freeze_at must be >= 0"):
        Trainer(tiny_model, tiny_loader, train_cfg, tmp_path / "bad", torch.device("cpu"))


def test_training_reduces_the_loss(tmp_path: Path, tiny_model, tiny_loader, train_cfg) -> None:
    train_cfg.max_steps = 80
    train_cfg.checkpoint_every = 100

    def mean_loss() -> float:
        tiny_model.train()
        with torch.no_grad():
            return sum(sum(tiny_model(i, t).values()).item() for i, t in tiny_loader) / len(tiny_loader)

    first = mean_loss()
    Trainer(tiny_model, tiny_loader, train_cfg, tmp_path, torch.device("cpu")).train()
    assert mean_loss() < 0.75 * first  # 0.56 with this seed


class CountingDataset(torch.utils.data.Dataset):
    """10 blank images whose box starts at x = index; records which images were read."""

    def __init__(self) -> None:
        self.reads: list[int] = []

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        self.reads.append(i)
        return torch.zeros(3, 64, 64), {"boxes": torch.tensor([[float(i), 0.0, i + 10.0, 10.0]]), "labels": torch.tensor([0])}


def test_mid_epoch_resume_continues_the_epoch_without_loading_the_seen_images(tmp_path: Path, tiny_model, train_cfg) -> None:
    """5 batches per epoch; resuming at step 7 (epoch 1, batch 2) yields the uninterrupted run's batches 7, 8, ...
    and reads only the images of the batches it yields."""
    from densekit.data.loader import build_loader

    def stream(step: int, take: int) -> tuple[list[list[int]], list[int]]:
        dataset = CountingDataset()
        loader = build_loader(dataset, batch_size=2, train=True, num_workers=0, seed=0)
        trainer = Trainer(tiny_model, loader, train_cfg, tmp_path / f"run{step}", torch.device("cpu"))
        trainer.step = step
        batches = []
        for _, (_, targets) in itertools.islice(trainer._batches(), take):
            batches.append([int(t["boxes"][0, 0]) for t in targets])
        return batches, dataset.reads

    full, _ = stream(0, 10)
    resumed, reads = stream(7, 3)
    assert resumed == full[7:10]
    assert len(reads) == 6  # 3 batches of 2: the epoch's first 2 batches were never loaded
    assert full[:5] != full[5:10]  # epochs are shuffled differently, so the comparison means something


def test_channels_last_training_computes_what_nchw_training_does(tmp_path: Path, tiny_model, tiny_loader, train_cfg) -> None:
    """train.channels_last (the default): NHWC weights and batches, the same loss and the same weights after the
    update (up to the float rounding of other convolution kernels), and checkpoints in the usual NCHW layout."""
    import copy

    train_cfg.max_steps, train_cfg.checkpoint_every, train_cfg.ema_decay = 1, 1, 0.0
    runs = {}
    for channels_last in (False, True):
        train_cfg.channels_last = channels_last
        model = copy.deepcopy(tiny_model)
        torch.manual_seed(0)  # the same drop-path masks in both runs
        trainer = Trainer(model, tiny_loader, train_cfg, tmp_path / str(channels_last), torch.device("cpu"))
        trainer.train()
        conv = model.backbone.body.conv_stem.weight  # [32, 3, 3, 3]: the two layouts differ
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        runs[channels_last] = (model.state_dict(), trainer.loss)
    (nchw, nchw_loss), (nhwc, nhwc_loss) = runs[False], runs[True]
    torch.testing.assert_close(nhwc_loss, nchw_loss, rtol=1e-5, atol=0)
    initial = tiny_model.state_dict()
    updates = {k: (v - initial[k], nhwc[k] - initial[k]) for k, v in nchw.items() if v.is_floating_point()}
    floor = 1e-3 * max(u.abs().max().item() for u, _ in updates.values())  # updates ~0 are float noise either way
    for key, (update, nhwc_update) in updates.items():  # gradients and BN statistics agree, relative to their size
        assert (nhwc_update - update).abs().max().item() <= 1e-2 * max(update.abs().max().item(), floor), key
    saved = ckpt.load_checkpoint(tmp_path / "True" / "checkpoints" / "last.pth")
    assert all(t.is_contiguous() for t in saved["model"].values())


@pytest.mark.slow  # compiling forward + backward takes a minute or more on 2 cores
def test_compiled_training_step_computes_what_the_eager_one_does(tmp_path: Path, tiny_model, tiny_loader, train_cfg) -> None:
    """train.compile: the same loss on the same weights and batch, and the same update, as eager training."""
    import copy

    train_cfg.max_steps, train_cfg.checkpoint_every, train_cfg.ema_decay = 1, 1, 0.0
    runs = {}
    for compiled in (False, True):
        train_cfg.compile = compiled
        model = copy.deepcopy(tiny_model)
        torch.manual_seed(0)
        trainer = Trainer(model, tiny_loader, train_cfg, tmp_path / str(compiled), torch.device("cpu"))
        assert (model.training_fn("network") != model.network) == compiled  # the network is what compiles
        trainer.train()
        runs[compiled] = (model.state_dict(), trainer.loss)
    (eager, eager_loss), (comp, comp_loss) = runs[False], runs[True]
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-4, atol=0)
    initial = tiny_model.state_dict()
    updates = {k: (v - initial[k], comp[k] - initial[k]) for k, v in eager.items() if v.is_floating_point()}
    floor = 1e-3 * max(u.abs().max().item() for u, _ in updates.values())
    for key, (update, comp_update) in updates.items():
        assert (comp_update - update).abs().max().item() <= 1e-2 * max(update.abs().max().item(), floor), key
