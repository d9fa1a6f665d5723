"""Label values with a meaning of their own in detection targets.

Datasets write them and models read them; they live here, in neither package, so that a dataset never imports
from :mod:`densekit.modeling` and a model never imports from :mod:`densekit.data`.
"""
from __future__ import annotations

#: Label of a crowd region (COCO ``iscrowd=1``) in a training target, and of the anchors the matcher leaves
#: unlabelled because they lie on one: those anchors count neither as positives nor as background in the loss.
CROWD_LABEL = -2
