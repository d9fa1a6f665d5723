import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights *and* BN statistics, scaled so activations stay O(1) through the whole network: a wrongly
    mapped or folded BatchNorm cannot hide behind identity statistics, and an absolute tolerance means something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) * 1.5 + 0.5)
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif t.dim() == 1:  # BN weight, fusion weights
                t.copy_(1.0 + torch.randn(t.shape, generator=gen) * 0.2)
            else:  # He-normal conv weights
                t.copy_(torch.randn(t.shape, generator=gen) * math.sqrt(2.0 / t[0].numel()))


@pytest.fixture(scope="session")
def randomise():
    """``randomise(model, seed=0)``: see :func:`_randomise`."""
    return _randomise


def _run_workers(fn, args: tuple, nprocs: int = 2, timeout: float = 60.0) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` forked processes; fail the test if any fails or they outlast ``timeout``.

    fork, as DataLoader workers do: spawn would re-import torch in each child (~5 s on two cores).
    """
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"distributed workers did not finish in {timeout:.0f} s")


@pytest.fixture(scope="session")
def run_workers():
    """``run_workers(fn, args, nprocs=2, timeout=60)``: see :func:`_run_workers`."""
    return _run_workers


def _write_custom_coco(root, num_train: int = 16, num_val: int = 6):
    """A user's own COCO-format dataset: 3 categories with ids 17, 5, 9 (listed in that order), images in
    sub-folders of one image root, train and val json files side by side. Built from the synthetic shapes
    (circle -> 17 "sphere", square -> 5 "box", triangle -> 9 "wedge"; the other shapes stay unannotated)."""
    import json
    import shutil
    from pathlib import Path

    from densekit.data.synthetic import ensure_synthetic_coco, synthetic_coco_paths

    root = Path(root)
    source = ensure_synthetic_coco(root / "_source", num_train=num_train, num_val=num_val)
    new_ids = {3: 17, 7: 5, 12: 9}
    categories = [{"id": 17, "name": "sphere"}, {"id": 5, "name": "box"}, {"id": 9, "name": "wedge"}]
    paths = {}
    for split in ("train", "val"):
        image_dir, ann_file = synthetic_coco_paths(source, split)
        data = json.loads(ann_file.read_text())
        for i, image in enumerate(data["images"]):
            name = f"{split}/{'day' if i % 2 else 'night'}/{image['file_name']}"  # file_name with sub-folders
            (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image_dir / image["file_name"], root / "images" / name)
            image["file_name"] = name
        data["annotations"] = [
            {**a, "category_id": new_ids[a["category_id"]]} for a in data["annotations"] if a["category_id"] in new_ids
        ]
        data["categories"] = categories
        paths[split] = root / f"{split}.json"
        paths[split].write_text(json.dumps(data))
    shutil.rmtree(root / "_source")
    return {"images": root / "images", "train": paths["train"], "val": paths["val"]}


@pytest.fixture(scope="session")
def custom_coco(tmp_path_factory):
    """``{"images", "train", "val"}`` paths of a small custom COCO-format dataset (see :func:`_write_custom_coco`)."""
    return _write_custom_coco(tmp_path_factory.mktemp("custom_coco"))


def _write_custom_seg(root, num_train: int = 6, num_val: int = 3, size: tuple[int, int] = (64, 96)):
    """A user's own segmentation data in the mmseg / ADE20K custom layout: ``images/<split>/<sub>/<n>.jpg`` with
    ``labels/<split>/<sub>/<n>.png`` (single channel; 0 ground, 1 block, 2 disc, 255 unlabelled border) and a
    ``classes.txt``. The image colours follow the classes, so a model can learn them."""
    from pathlib import Path

    import cv2
    import numpy as np

    root = Path(root)
    rng = np.random.default_rng(0)
    colours = np.array([[90, 140, 60], [200, 60, 50], [40, 80, 220]], np.uint8)
    for split, count in (("train", num_train), ("val", num_val)):
        for i in range(count):
            label = np.zeros(size, np.uint8)
            y, x = rng.integers(4, size[0] // 2), rng.integers(4, size[1] // 2)
            label[y : y + size[0] // 3, x : x + size[1] // 3] = 1
            cv2.circle(label, (int(rng.integers(20, size[1] - 20)), int(rng.integers(20, size[0] - 20))), 12, 2, -1)
            image = colours[label] + rng.integers(0, 30, (*size, 3)).astype(np.uint8)
            label[:2] = 255  # an unlabelled strip
            sub = "a" if i % 2 else "b"
            for folder, data, ext in (("images", image[..., ::-1], ".jpg"), ("labels", label, ".png")):
                path = root / folder / split / sub / f"{i:03d}{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), data)
    (root / "classes.txt").write_text("ground\nblock\ndisc\n")
    return {"root": root, "classes": root / "classes.txt"}


@pytest.fixture(scope="session")
def custom_seg(tmp_path_factory):
    """Paths of a small custom segmentation dataset (see :func:`_write_custom_seg`)."""
    return _write_custom_seg(tmp_path_factory.mktemp("custom_seg"))


class HostReads(torch.overrides.TorchFunctionMode):
    """Records every call that copies a tensor's data to the host (``.item()``, ``.tolist()``, ``.cpu()``,
    ``.numpy()``, ``.to("cpu")``) of a tensor on another device than ``device`` says, while active.

    ``device="any"`` records them on CPU tensors too, which lets a CPU test hold code to what it must do on a GPU.
    """

    NAMES = ("item", "tolist", "cpu", "numpy", "to")

    def __init__(self, device: str = "not-cpu") -> None:
        super().__init__()
        self.device = device
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.NAMES and args and isinstance(args[0], torch.Tensor) and self._watched(args[0]):
            if name != "to" or self._to_host(args[1:], kwargs):
                self.calls.append(name)
        return func(*args, **kwargs)

    def _watched(self, tensor: torch.Tensor) -> bool:
        return self.device == "any" or tensor.device.type != "cpu"

    @staticmethod
    def _to_host(args: tuple, kwargs: dict) -> bool:
        target = kwargs.get("device", args[0] if args else None)
        return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


@pytest.fixture
def host_reads():
    """``with host_reads(device="not-cpu") as reads: ...; reads.calls``: see :class:`HostReads`."""
    return HostReads
