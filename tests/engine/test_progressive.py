"""Progressive learning: the stage plan, and the trainer training each epoch on its stage's loader (resume too)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from densekit.config import TrainConfig
from densekit.data.progressive import StagedLoader, plan_stages, stage_scale_range, stage_size
from densekit.engine.trainer import Trainer


class Squares(torch.utils.data.Dataset):
    """``n`` images of ``size`` px with one box each."""

    def __init__(self, n: int, size: int = 64) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        image = torch.full((3, self.size, self.size), 0.1)
        image[:, 8:40, 8:40] = 0.9
        return image, {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([i % 2])}


def collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def test_stages_grow_size_and_jitter_to_the_full_ones() -> None:
    stages = plan_stages(3, epochs=12, min_size=0.6, min_jitter=0.5)
    assert [s.first_epoch for s in stages] == [0, 4, 8]
    assert [stage_size(256, s.size_fraction, 32) for s in stages] == [160, 192, 256]  # 153.6 and 204.8 rounded
    assert stage_scale_range([0.6, 1.4], stages[0].jitter_fraction) == pytest.approx([0.8, 1.2])
    assert stage_scale_range([0.6, 1.4], stages[-1].jitter_fraction) == pytest.approx([0.6, 1.4])
    assert plan_stages(1, epochs=5, min_size=0.6, min_jitter=0.5)[0].size_fraction == 1.0
    with pytest.raises(ValueError, match="needs at least as many epochs"):
        plan_stages(4, epochs=3, min_size=0.6, min_jitter=0.5)
    with pytest.raises(ValueError, match="progressive_min_size"):
        plan_stages(2, epochs=4, min_size=0.0, min_jitter=0.5)


def test_loaders_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="same number of batches"):
        StagedLoader([(0, DataLoader(Squares(n=4), batch_size=2)), (1, DataLoader(Squares(n=6), batch_size=2))])


def test_trainer_trains_each_epoch_at_its_stage_size_and_resumes_into_the_right_stage(tmp_path: Path, tiny_model) -> None:
    def staged() -> StagedLoader:
        sizes = {0: 64, 1: 96}  # epoch 0 at 64 px, from epoch 1 on at 96 px; 4 batches an epoch
        loaders = [(e, DataLoader(Squares(n=8, size=s), batch_size=2, shuffle=True, collate_fn=collate,
                                  generator=torch.Generator())) for e, s in sizes.items()]
        return StagedLoader(loaders, ["(64 px)", "(96 px)"])

    cfg = TrainConfig(batch_size=2, max_steps=6, lr=0.01, checkpoint_every=6, ema_decay=0.0, num_workers=0)
    trainer = Trainer(tiny_model, staged(), cfg, tmp_path, torch.device("cpu"))
    seen: list[int] = []
    step = trainer.run_step
    trainer.run_step = lambda images, targets: (seen.append(images.shape[-1]), step(images, targets))
    trainer.train()
    assert seen == [64] * 4 + [96] * 2

    cfg.max_steps = 10  # a longer plan, resumed from step 6 (epoch 1, batch 2): still the second stage
    resumed = Trainer(tiny_model, staged(), cfg, tmp_path, torch.device("cpu"))
    seen.clear()
    step = resumed.run_step
    resumed.run_step = lambda images, targets: (seen.append(images.shape[-1]), step(images, targets))
    resumed.train()
    assert seen == [96] * 4


def test_each_task_turns_a_stage_into_its_data_overrides() -> None:
    from omegaconf import OmegaConf

    from densekit.data.progressive import Stage
    from densekit.tasks import TASKS

    first = Stage(0, size_fraction=0.5, jitter_fraction=0.5)
    det = OmegaConf.create({"data": {"image_size": 512, "augment": {"scale_range": [0.1, 2.0]}}, "model": {}})
    overrides, description = TASKS.get("detection").stage_overrides(det, first, 128)
    assert overrides == {"image_size": 256, "augment": {"scale_range": pytest.approx([0.575, 1.525])}}
    assert description.startswith("(256 px, scale jitter 0.5")
    seg = OmegaConf.create({"data": {"crop_size": [512, 1024], "augment": {"scale_range": [0.5, 2.0]}}})
    overrides, _ = TASKS.get("segmentation").stage_overrides(seg, first, 32)
    assert overrides == {"crop_size": [256, 512], "augment": {"scale_range": pytest.approx([0.875, 1.625])}}
