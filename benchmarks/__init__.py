"""Benchmark and table tools beside the package (not installed with it): latency and training throughput against
the reference implementations (effdet, torchvision), and the model tables of docs/.

Run the scripts from the repository root, e.g. ``python benchmarks/benchmark.py model=efficientdet_d0
bench.compare=true``; tests import the modules as ``benchmarks.<name>``.
"""
