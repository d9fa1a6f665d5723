"""A failed final evaluation never loses a run: the last step's checkpoint is on disk and the error names the image
and the tools/eval.py command that evaluates the checkpoint, skipping it. The evaluation of a split with images
left out (data.skip_unreadable) scores only the images it evaluated: COCOeval over those image ids, the confusion
matrix over those pixels."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from densekit.checkpoint.train_state import load_checkpoint
from densekit.config import TrainConfig
from densekit.data.coco import CocoDetection
from densekit.data.loader import build_loader
from densekit.data.seg_folder import SegmentationFolder
from densekit.engine.hooks import HookBase
from densekit.engine.trainer import FinalEvaluationError, Trainer
from densekit.evaluation.coco import CocoEvaluator
from densekit.evaluation.loop import evaluate_detector, evaluate_segmenter
from densekit.evaluation.rerun import eval_command

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=efficientdet_d0", "model.neck.repeats=1", "model.neck.channels=16", "model.head.repeats=1",
        "data=custom", "data.image_size=64", "train.max_steps=2", "train.batch_size=2", "train.lr=0.001",
        "train.num_workers=0", "train.backbone_weights=none", "train.eval_every_epochs=0"]


def cut_before_scan(path: Path) -> None:
    """Keep a JPEG's header (its size, tables) and drop its image data: the check before training passes it, the
    decoder refuses it."""
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xff\xda")])


class Replay(nn.Module):
    """A "model" answering the images it is given with the next of ``outputs`` (the order of the evaluation), so a
    test controls the predictions, e.g. a perfect detector."""

    def __init__(self, outputs: list[dict[str, torch.Tensor]], **attributes: int) -> None:
        super().__init__()
        self.outputs, self.seen = outputs, 0
        self.__dict__.update(attributes)

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = self.outputs[self.seen : self.seen + len(images)]
        self.seen += len(images)
        assert len(out) == len(images), "the model was given more images than evaluated"
        return out


def perfect_detections(dataset: CocoDetection, indices: list[int]) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in indices:
        boxes, labels = dataset.annotations(i)
        out.append({"boxes": torch.as_tensor(boxes), "scores": torch.ones(len(labels)),
                    "labels": torch.as_tensor(labels)})
    return out


def test_coco_scores_only_the_evaluated_images(custom_coco, tmp_path: Path) -> None:
    shutil.copytree(custom_coco["images"], tmp_path / "images")
    dataset = CocoDetection(tmp_path / "images", custom_coco["val"], train=False, unreadable="skip")
    skipped = next(i for i in range(len(dataset)) if len(dataset.annotations(i)[0]))  # an image with boxes
    cut_before_scan(dataset.image_path(skipped))
    kept = [i for i in range(len(dataset)) if i != skipped]
    loader = build_loader(dataset, 2, train=False, num_workers=0)
    model = Replay(perfect_detections(dataset, kept))
    metrics = evaluate_detector(model, dataset, loader, torch.device("cpu"), tmp_path / "out", "val", "replay",
                                dataset.label_to_cat_id)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)
    assert metrics["skipped_images"] == 1 and metrics["skipped_files"] == [str(dataset.image_path(skipped))]
    # The same detections with the skipped image scored (no detections on it): its boxes count as misses.
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_cat_id)
    images = [dataset.coco.imgs[dataset.image_ids[i]] for i in kept]
    targets = [{"image_id": im["id"], "scale": 1.0, "orig_size": (im["height"], im["width"])} for im in images]
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    skipped_target = {"image_id": dataset.image_ids[skipped], "scale": 1.0, "orig_size": (1, 1)}
    evaluator.update(perfect_detections(dataset, kept) + [empty], targets + [skipped_target])
    assert evaluator.evaluate()["AR100"] < 1.0


def test_segmentation_leaves_the_skipped_image_out_of_the_confusion_matrix(custom_seg, tmp_path: Path) -> None:
    shutil.copytree(custom_seg["root"], tmp_path / "seg")
    root = tmp_path / "seg"
    dataset = SegmentationFolder(root / "images" / "val", root / "labels" / "val", ["ground", "block", "disc"],
                                 unreadable="skip")
    labels = [torch.as_tensor(dataset.load_label(i)).long() for i in range(len(dataset))]
    dataset.image_path(1).write_bytes(b"")  # unreadable
    perfect = [{"sem_seg": torch.where(label == 255, 0, label)} for i, label in enumerate(labels) if i != 1]
    model = Replay(perfect, num_classes=3, ignore_index=255)
    loader = build_loader(dataset, 2, train=False, num_workers=0)
    metrics = evaluate_segmenter(model, dataset, loader, torch.device("cpu"), tmp_path / "out", "val")
    assert metrics["mIoU"] == pytest.approx(1.0) and metrics["skipped_images"] == 1


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, images: torch.Tensor, targets: list | None = None) -> dict[str, torch.Tensor]:
        return {"loss": (self.w * images.mean()) ** 2}


class AfterTrain(HookBase):
    """A hook after the evaluation: whether its ``after_train`` ran, and what training raised."""

    called = False
    raised: BaseException | None = None

    def after_train(self) -> None:
        self.called = True


def train_with_failing_evaluation(run: Path, error: Exception) -> AfterTrain:
    """Train 2 steps whose final evaluation raises ``error`` (after checking that the step-2 checkpoint is on
    disk); returns a hook registered after the evaluation, which records whether its ``after_train`` ran."""
    def evaluate(model: nn.Module) -> dict:
        assert load_checkpoint(run / "checkpoints" / "last.pth")["step"] == 2  # on disk before the evaluation
        raise error

    batches = [(torch.rand(2, 3, 8, 8), [{}, {}])] * 2
    cfg = TrainConfig(batch_size=2, max_steps=2, lr=0.01, ema_decay=0, warmup_epochs=0, num_workers=0,
                      channels_last=False)
    trainer = Trainer(Tiny(), batches, cfg, run, torch.device("cpu"), evaluate)
    later = AfterTrain()
    trainer.register_hooks([later])
    with pytest.raises(Exception) as raised:
        trainer.train()
    later.raised = raised.value
    return later


def test_a_failed_final_evaluation_names_the_checkpoint_of_the_last_step(tmp_path: Path) -> None:
    error = OSError("cannot decode image file a.jpg")
    later = train_with_failing_evaluation(tmp_path, error)
    assert later.called  # the hooks after the evaluation still finished the run's record
    checkpoint = tmp_path / "checkpoints" / "last.pth"
    raised = later.raised
    assert isinstance(raised, FinalEvaluationError) and isinstance(raised, ValueError)
    assert raised.checkpoint == checkpoint and raised.error is error
    assert str(raised) == ("training finished, but its final evaluation failed: cannot decode image file a.jpg\n"
                           f"the weights of the last step are saved in {checkpoint}")


def test_another_failure_of_the_final_evaluation_keeps_its_type_and_traceback(tmp_path: Path) -> None:
    error = RuntimeError("CUDA out of memory")
    later = train_with_failing_evaluation(tmp_path, error)
    assert later.called and later.raised is error  # not a user's error: a bug or the machine, with its traceback
    checkpoint = tmp_path / "checkpoints" / "last.pth"
    assert error.__notes__ == [f"training finished; the weights of the last step are saved in {checkpoint}"]


def test_the_eval_command_keeps_what_defines_the_evaluation(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    overrides = ["model.neck.channels=16", "+data.extra=1", "data.augment.scale_range=[0.8,1.2]", "train.lr=0.1",
                 "weights=init.pth", "hydra.run.dir=/runs/a b", "device=cpu", "eval.batch_size=4",
                 "data.skip_unreadable=false"]
    command = eval_command(overrides, {"model": "efficientdet_d0", "data": "custom"}, Path("/runs/a b/last.pth"),
                           True, ("python", ROOT / "tools" / "eval.py"))
    assert shlex.split(command) == [
        "python", "tools/eval.py",
        "model=efficientdet_d0", "data=custom", "model.neck.channels=16", "+data.extra=1",
        "data.augment.scale_range=[0.8,1.2]", "device=cpu", "eval.batch_size=4", "weights=/runs/a b/last.pth",
        "data.skip_unreadable=true",
    ]


def test_a_failed_final_evaluation_names_the_image_and_the_command_that_evaluates(custom_coco, tmp_path: Path) -> None:
    shutil.copytree(custom_coco["images"], tmp_path / "images")
    broken = tmp_path / "images" / json.loads(custom_coco["val"].read_text())["images"][0]["file_name"]
    cut_before_scan(broken)  # passes the check before training; the final evaluation cannot decode it
    data = [f"data.train_images={tmp_path / 'images'}", f"data.train_annotations={custom_coco['train']}",
            f"data.val_images={tmp_path / 'images'}", f"data.val_annotations={custom_coco['val']}"]
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), *TINY, *data, f"hydra.run.dir={run}"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    checkpoint = run / "checkpoints" / "last.pth"
    failed = f"error: training finished, but its final evaluation failed: cannot decode image file {broken}"
    assert failed in done.stderr
    assert f"the weights of the last step are saved in {checkpoint}" in done.stderr
    assert load_checkpoint(checkpoint)["step"] == 2
    command = done.stderr.split("evaluate them with:\n")[1].splitlines()[0].strip()
    args = shlex.split(command)
    assert args[:2] == ["python", "tools/eval.py"] and f"weights={checkpoint}" in args
    assert args[-1] == "data.skip_unreadable=true" and set(TINY[:4]) <= set(args) and set(data) <= set(args)
    evaluated = subprocess.run([sys.executable, *args[1:], f"hydra.run.dir={tmp_path / 'eval'}"],
                               env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["skipped_files"] == [str(broken)] and metrics["AP"] >= 0
