"""``densekit inspect`` run from a checkout: ``python tools/inspect_dataset.py`` takes the same arguments.

The code ships with the package (:mod:`densekit.cli.inspect_dataset`), so that an installed densekit has the command
too.
"""
from densekit.cli.inspect_dataset import main

if __name__ == "__main__":
    main()
