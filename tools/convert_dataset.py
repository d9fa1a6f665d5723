"""``densekit convert`` run from a checkout: ``python tools/convert_dataset.py`` takes the same arguments.

The code ships with the package (:mod:`densekit.cli.convert_dataset`), so that an installed densekit has the command too.
"""
from densekit.cli.convert_dataset import main

if __name__ == "__main__":
    main()
