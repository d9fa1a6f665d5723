"""Print a one-screen summary of a model: parameters per part, MACs, anchors and the output levels.

Usage (``python tools/summary.py`` in a checkout takes the same overrides)::

    densekit summary model=efficientdet_d3
    densekit summary model=efficientdet_lite0 image_size=[512,512]

The model is built on the meta device (shapes, no weights), so even D7x summarises in about a second.
"""
from __future__ import annotations

import logging

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

import densekit
from densekit.cli.errors import reports_user_errors, run_tool
from densekit.config import image_size_arg, register_configs
from densekit.tasks import task_of_model

log = logging.getLogger(__name__)


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
@reports_user_errors()
def hydra_main(cfg: DictConfig) -> None:
    """Entry point: build ``cfg.model`` and print its summary."""
    model = build_shapes_only(cfg.model).eval()
    size = image_size_arg(cfg.image_size, model.config.image_size)
    print(task_of_model(model.config).summary(model, size))


def main() -> None:
    """Entry point: a user's mistake is one ``error:`` block, exit code 2 (densekit.cli.errors)."""
    run_tool(hydra_main)


if __name__ == "__main__":
    main()
