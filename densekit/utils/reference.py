"""Published numbers densekit is checked against (the paper's parameters and MACs).

Source: Tan, Pang, Le, "EfficientDet: Scalable and Efficient Object Detection" (CVPR 2020), Table 2, as collected
in the project's reference notes. The paper gives parameters to 0.1M and MACs to three significant digits; it
publishes no counts for the Lite models.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperNumbers:
    """One model's published complexity.

    Attributes:
        params: Parameters (90-class COCO head), as rounded in the paper.
        macs: Multiply-adds at the model's input size (the paper's "FLOPs").
    """

    params: float
    macs: float


PAPER: dict[str, PaperNumbers] = {
    "efficientdet_d0": PaperNumbers(3.9e6, 2.54e9),
    "efficientdet_d1": PaperNumbers(6.6e6, 6.10e9),
    "efficientdet_d2": PaperNumbers(8.1e6, 11.0e9),
    "efficientdet_d3": PaperNumbers(12.0e6, 24.9e9),
    "efficientdet_d4": PaperNumbers(20.7e6, 55.2e9),
    "efficientdet_d5": PaperNumbers(33.7e6, 130e9),
    "efficientdet_d6": PaperNumbers(51.9e6, 226e9),
    "efficientdet_d7": PaperNumbers(51.9e6, 325e9),
    "efficientdet_d7x": PaperNumbers(77.0e6, 410e9),
}


