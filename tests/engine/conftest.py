"""A tiny detection setup for engine tests: 64-px images with one box each, a 1-repeat EfficientDet-D0."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import densekit
from densekit.config import TrainConfig


class BoxesDataset(Dataset):
    """Bright squares on dark images: one box per image, class = image index % 2."""

    def __init__(self, n: int = 8, size: int = 64) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        img = torch.rand(3, self.size, self.size, generator=g) * 0.2
        x0, y0 = 4 + 3 * (i % 5), 6 + 2 * (i % 7)
        img[:, y0 : y0 + 24, x0 : x0 + 24] = 0.9
        target = {"boxes": torch.tensor([[x0, y0, x0 + 24, y0 + 24]], dtype=torch.float32), "labels": torch.tensor([i % 2])}
        return img, target


def collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return densekit.create_model("efficientdet_d0", num_classes=2, image_size=[64, 64], neck={"repeats": 1, "channels": 16}, head={"repeats": 1})


@pytest.fixture
def tiny_loader():
    return DataLoader(BoxesDataset(), batch_size=2, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def train_cfg():
    return TrainConfig(batch_size=2, max_steps=6, lr=0.01, warmup_epochs=0.5, checkpoint_every=2, ema_decay=0.9, log_every=1, num_workers=0)


class InterruptAfter:
    """Wraps a loader and raises KeyboardInterrupt after ``n`` batches in total (a Ctrl-C / kill mid-run)."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n, self.count = loader, n, 0
        self.sampler, self.generator = loader.sampler, loader.generator

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.count == self.n:
                raise KeyboardInterrupt
            self.count += 1
            yield batch


@pytest.fixture
def interrupt_after() -> type[InterruptAfter]:
    """:class:`InterruptAfter`, for tests that stop a training mid-run."""
    return InterruptAfter
