"""Benchmark and table tools of the repository, beside the package (not installed with it): the model tables of
docs/ (``table.py``), training throughput against effdet (``train_benchmark.py``) and the precisions comparison
(``precisions.py``). The latency benchmark itself ships with densekit (:mod:`densekit.benchmarks`, ``densekit
benchmark``); ``benchmark.py`` here runs it.

Run the scripts from the repository root, e.g. ``python benchmarks/table.py table=models``; tests import the modules
as ``benchmarks.<name>``.
"""
