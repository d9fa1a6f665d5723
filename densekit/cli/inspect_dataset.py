"""Inspect a dataset: ``densekit inspect model=... data=...`` (``python tools/inspect_dataset.py`` in a checkout).

Reads the split's annotations as written (``inspect.split``, default the training split) and prints a one-screen
summary: images and boxes per class, boxes per image, box sizes and aspect ratios at the model's input size, the
model's anchor recall with anchors fitted to the boxes (the overrides to paste), and the problems (empty images,
duplicate files, boxes outside their image or smaller than the smallest anchor, json sizes that disagree with the
image files, classes without boxes; segmentation: class pixel shares and label values outside the classes). Charts, a
mosaic of samples and every problem go to ``<run dir>/inspect/`` (``inspect.out``). ``inspect.strict=true`` then
exits with code 2 listing the problems (``inspect.allow=[kind,...]`` lets kinds pass). See
:mod:`densekit.data.inspection`.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from densekit.cli.errors import reports_user_errors, run_tool
from densekit.config import register_configs
from densekit.data.coco import CocoDetection
from densekit.data.inspection import Inspection, inspect_detection, inspect_segmentation
from densekit.modeling.model_spec import finish_run_config
from densekit.tasks import get_task
from densekit.tasks.detection import input_size


def inspect_dataset(cfg: DictConfig, run_dir: Path | None = None) -> Inspection:
    """Inspect ``cfg.data``'s split for ``cfg.model``, print the summary, write the report to ``inspect.out`` (or
    ``<run_dir>/inspect``; ``run_dir`` defaults to the Hydra job's output folder).

    Raises:
        DatasetProblems: ``inspect.strict`` and problems of kinds not in ``inspect.allow`` (exit code 2).
    """
    task = get_task(cfg)
    finish_run_config(cfg)  # the model config as a run would have it (weights= may record its anchors)
    split = str(cfg.inspect.split or cfg.data.train_split)
    dataset = task.build_dataset(cfg, split, train=False)
    if cfg.inspect.out:
        out = Path(str(cfg.inspect.out)).expanduser()
    else:
        out = (run_dir if run_dir is not None else Path(HydraConfig.get().runtime.output_dir)) / "inspect"
    samples = int(cfg.inspect.samples)
    if isinstance(dataset, CocoDetection):
        report = inspect_detection(dataset, split, cfg.model, input_size(cfg.data, cfg.model), out, samples,
                                   name=str(cfg.data.name))
    else:
        report = inspect_segmentation(dataset, split, out, samples, name=str(cfg.data.name))
    print(report.summary(), flush=True)
    if cfg.inspect.strict:
        report.check(allow=[str(kind) for kind in cfg.inspect.allow or []])
    return report


register_configs()


@hydra.main(config_path="../conf", config_name="inspect", version_base=None)
@reports_user_errors()
def hydra_main(cfg: DictConfig) -> None:
    inspect_dataset(cfg)


def main() -> None:
    """Entry point: a user's mistake (and, with ``inspect.strict=true``, a dataset with problems) is one ``error:``
    block, exit code 2 (densekit.cli.errors)."""
    run_tool(hydra_main)


if __name__ == "__main__":
    main()
