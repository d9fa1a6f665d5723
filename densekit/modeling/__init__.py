"""Models: backbones, the BiFPN neck, EfficientDet / ESeg / LR-ASPP heads, the detector and segmenter
meta-architectures with their anchors, target matching, losses and post-processing, and building them from
``conf/model`` entries (``build``)."""
