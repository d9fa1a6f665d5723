"""Deployment: inference-only rewrites of a trained model (``optimize``: BatchNorm folding, channels_last,
``torch.compile`` with inductor freezing), ONNX export with an onnxruntime parity check (``onnx``) and int8 / bf16
inference (``quantize``: PT2E via torchao).

``densekit.optimize_for_inference`` is :func:`densekit.deploy.optimize.optimize_for_inference`. This package
imports nothing itself, so that using one part does not load the other (``onnx`` needs the ONNX extras).
"""
