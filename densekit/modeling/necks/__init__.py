"""Necks that turn backbone features into a feature pyramid: the BiFPN (P3-P7, extended to P3-P9)."""
