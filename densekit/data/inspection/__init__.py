"""What is in a dataset and what is wrong with it, as the files have it (``densekit inspect``).

A detection dataset is read from its json as written (not from the cleaned training samples: a box the loader clips
or drops is reported as it is in the file): images and boxes per class, boxes per image, box sizes and aspect ratios at
the model's input size, the model's anchor recall and anchors fitted to the boxes
(:mod:`densekit.modeling.anchor_fit`), and the problems:

======================  ===========================================================================================
``unreadable_image``    image files that are missing, empty or not images (:mod:`densekit.data.checks`)
``size_mismatch``       a json size (a label's size) that disagrees with the image file's header
``duplicate_file``      files with the same content (SHA-1), or one file listed twice
``empty_image``         images without boxes (crowd regions aside)
``degenerate_box``      boxes of zero width or height (training drops them)
``outside_box``         boxes wholly, or by more than 1 px partly, outside their image (training drops / clips them)
``small_box``           boxes smaller than the smallest anchor at the input size (square root of the area)
``class_without_boxes`` categories that no box has
``low_anchor_recall``   anchor recall below :data:`~densekit.modeling.anchor_fit.WARN_BELOW`
``label_values``        segmentation label values that are neither classes nor the ignore value
``class_without_pixels`` segmentation classes that no label pixel has
======================  ===========================================================================================

A segmentation dataset reports each class's share of the labelled pixels and the images that hold it. Both write a
report folder: ``summary.txt`` (the one-screen summary), ``problems.txt`` (every problem), ``report.json`` (the
numbers), PNG charts (matplotlib, Agg) and ``samples.jpg``, a mosaic of sample images with their boxes or labels.
"""
from __future__ import annotations

from .detection import inspect_detection
from .report import KINDS, DatasetProblems, Inspection, Problem
from .segmentation import inspect_segmentation

__all__ = ["KINDS", "DatasetProblems", "Inspection", "Problem", "inspect_detection", "inspect_segmentation"]
