"""``densekit summary`` run from a checkout: ``python tools/summary.py`` takes the same arguments.

The code ships with the package (:mod:`densekit.cli.summary`), so that an installed densekit has the command too.
"""
from densekit.cli.summary import main

if __name__ == "__main__":
    main()
