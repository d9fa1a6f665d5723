"""``python benchmarks/benchmark.py [overrides]``: the checkout's way to run ``densekit benchmark``, whose code ships
with the package (:mod:`densekit.benchmarks.benchmark`)."""
from densekit.benchmarks.benchmark import main

if __name__ == "__main__":
    main()
