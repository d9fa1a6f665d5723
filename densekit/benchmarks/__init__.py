"""Latency benchmarks that ship with densekit: ``densekit benchmark`` (:mod:`densekit.benchmarks.benchmark`), timed
the one way :mod:`densekit.benchmarks.timing` times code, beside the reference implementations
(:mod:`densekit.benchmarks.references`: effdet and torchvision, imported only when ``bench.compare=true``) and the
deployment runtimes (:mod:`densekit.benchmarks.backends`).

The repository's ``benchmarks/`` folder keeps what a checkout alone needs: the model tables of docs/ (``table.py``),
the training-step comparison with effdet (``train_benchmark.py``), ``precisions.py``, and ``benchmark.py``, a script
that runs this package's benchmark (``python benchmarks/benchmark.py ...``, as the docs' commands are written).
"""
