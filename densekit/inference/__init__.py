"""Inference beyond one forward pass of a detector: test-time augmentation, sliced (tiled) inference for large
images, the box merges they share, and multi-object tracking over video frames."""
