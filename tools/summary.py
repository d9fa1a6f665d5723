"""Print a one-screen summary of a model: parameters per part, MACs, anchors and the output levels.

Usage::

    python tools/summary.py model=efficientdet_d3
    python tools/summary.py model=efficientdet_lite0 image_size=[512,512]

The model is built on the meta device (shapes, no weights), so even D7x summarises in about a second.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import hydra
import torch
from omegaconf import DictConfig, ListConfig
from torch import nn

import densekit
from densekit.config import register_configs
from densekit.tasks import task_of_model

log = logging.getLogger(__name__)


def input_size(value: object, default: Sequence[int]) -> tuple[int, int]:
    """``image_size`` as ``(H, W)``: None -> ``default``, an int -> square, a pair -> itself."""
    if value is None:
        value = default
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple, ListConfig)) and len(value) == 2:
        return int(value[0]), int(value[1])
    sys.exit(f"image_size must be an int or [H, W], got {value!r}")


def build_shapes_only(model_cfg: DictConfig) -> nn.Module:
    """Build on the meta device when possible: no weight initialisation, no memory, instant for big models."""
    try:
        with torch.device("meta"):
            return densekit.build_model(model_cfg)
    except (NotImplementedError, RuntimeError) as err:  # e.g. a backbone that loads weights while building
        log.info("building on the meta device failed (%s); building on the CPU", err)
        return densekit.build_model(model_cfg)


register_configs()


@hydra.main(config_path="../conf", config_name="summary", version_base=None)
def main(cfg: DictConfig) -> None:
    """Entry point: build ``cfg.model`` and print its summary."""
    model = build_shapes_only(cfg.model).eval()
    size = input_size(cfg.image_size, model.config.image_size)
    print(task_of_model(model.config).summary(model, size))


if __name__ == "__main__":
    main()
