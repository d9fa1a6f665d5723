"""``densekit train`` run from a checkout: ``python tools/train.py`` takes the same arguments.

The code ships with the package (:mod:`densekit.cli.train`), so that an installed densekit has the command too.
"""
from densekit.cli.train import main

if __name__ == "__main__":
    main()
