"""DataLoader construction for every task: batching, (distributed) sampling and reproducible per-worker seeding."""
from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler, get_worker_info


def collate_batch(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Stack ``(image, target)`` pairs into ``images [B, 3, H, W]`` and a list of targets.

    Images of different sizes (no transform) are zero-padded at the bottom / right to the largest, which leaves
    box coordinates valid; each target's ``size`` still gives its unpadded extent.
    """
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    if all(img.shape == images[0].shape for img in images):
        return torch.stack(images), targets
    h = max(img.shape[-2] for img in images)
    w = max(img.shape[-1] for img in images)
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for img, dst in zip(images, out):
        dst[:, : img.shape[-2], : img.shape[-1]].copy_(img)
    return out, targets


class ResumableSampler(Sampler[int]):
    """A sampler whose next pass can start part-way, so that a run resumed mid-epoch reads no image twice.

    Wraps the loader's real sampler (random, sequential or distributed); :meth:`skip_next` drops the first ``n``
    indices of the next pass only. Skipping indices costs nothing, whereas skipping batches means loading and
    augmenting them: an epoch's worth of decoding on COCO. The indices that remain are those the uninterrupted pass
    would have produced, so the batches (``n`` a multiple of the batch size) are the same.
    """

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler
        self._skip = 0

    def skip_next(self, n: int) -> None:
        """Start the next pass after its first ``n`` indices."""
        if n < 0:
            raise ValueError(f"cannot skip {n} indices")
        self._skip = n

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to a ``DistributedSampler``, whose shuffle depends on the epoch."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return itertools.islice(iter(self.sampler), skip, None)

    def __len__(self) -> int:
        return len(self.sampler)  # the full pass: the loader's length (steps per epoch) must not change


def seed_transforms(dataset: Any, seed: int) -> None:
    """Seed the random transform(s) of ``dataset``, looking through ``Subset`` / ``ConcatDataset`` wrappers.

    A transform takes part if it has ``set_random_seed(seed)`` (like :class:`DetectionTransform`).
    """
    pending, seen = [dataset], set()
    while pending:
        ds = pending.pop()
        if id(ds) in seen:
            continue
        seen.add(id(ds))
        transform = getattr(ds, "transform", None)
        if callable(getattr(transform, "set_random_seed", None)):
            transform.set_random_seed(seed)
        pending.extend(getattr(ds, "datasets", []))  # ConcatDataset
        if getattr(ds, "dataset", None) is not None:  # Subset
            pending.append(ds.dataset)


def _worker_init(worker_id: int, rank: int = 0) -> None:
    # torch seeds each worker with base_seed + worker_id, base_seed drawn from the loader's generator: derive the
    # transform / numpy / random seeds from it, so they differ per worker yet repeat across runs. The rank is mixed
    # in too, since a caller may re-seed the generator identically on every rank (e.g. per epoch, for resuming).
    seed = int(np.random.SeedSequence([torch.initial_seed(), rank]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    # Workers are the parallelism; OpenCV's own threads on top would oversubscribe the cores.
    cv2.setNumThreads(0)
    info = get_worker_info()
    if info is not None:
        seed_transforms(info.dataset, seed)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 2,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool | None = None,
) -> DataLoader:
    """A DataLoader yielding ``(images [B, 3, S, S], targets)`` from a detection dataset.

    Args:
        dataset: E.g. :class:`CocoDetection`.
        batch_size: Images per batch (per process when distributed).
        train: Shuffle (a new order per epoch) and, by default, drop the last incomplete batch.
        num_workers: Worker processes; with any, they persist across epochs.
        distributed: Shard with a ``DistributedSampler`` (requires an initialised process group). Call
            ``loader.sampler.set_epoch(epoch)`` every epoch for a new shuffle. In evaluation the sampler pads the
            last shard with repeated images: deduplicate predictions by ``image_id``.
            Either way ``loader.sampler`` is a :class:`ResumableSampler` (``skip_next`` for mid-epoch resumes).
        seed: Seed of the shuffle and of the augmentations.
        drop_last: Defaults to ``train``.

    Returns:
        The loader. With ``num_workers=0`` the dataset's transform is seeded here from ``seed`` (and the rank);
        with workers, each worker seeds its own copy.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    drop_last = train if drop_last is None else drop_last
    rank = 0
    if distributed:
        distributed_sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=False)
        rank = distributed_sampler.rank
    # Ranks get different augmentation seeds but, through the sampler's shared seed, the same shuffle.
    loader_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(loader_seed)
    if num_workers == 0:
        seed_transforms(dataset, loader_seed)
    if distributed:
        base: Sampler[int] = distributed_sampler
    elif train:  # shuffled with the loader's generator, as DataLoader(shuffle=True, generator=...) would
        base = RandomSampler(dataset, generator=generator)
    else:
        base = SequentialSampler(dataset)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ResumableSampler(base),
        num_workers=num_workers,
        collate_fn=collate_batch,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=functools.partial(_worker_init, rank=rank) if num_workers > 0 else None,
        generator=generator,
    )
    if len(loader) == 0:
        raise ValueError(
            f"the loader yields no batches: {len(loader.sampler)} images per process with batch_size={batch_size} "
            "and drop_last=True; use a smaller batch or drop_last=False"
        )
    return loader
