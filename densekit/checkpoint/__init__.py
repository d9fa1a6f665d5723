"""Checkpoints: reading, checked loading and atomic writing (``io``), layout converters and ``weights=`` loading
(``convert``), and training states with resume (``train_state``).

Import from the submodules; this package imports nothing itself, so that models, data and tools can use
:mod:`densekit.checkpoint.io` without pulling in the rest.
"""
