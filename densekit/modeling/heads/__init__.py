"""Prediction heads: EfficientDet's shared class / box towers, ESeg's multi-level fusion head, and LR-ASPP."""
