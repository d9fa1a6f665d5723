"""``densekit export`` run from a checkout: ``python tools/export.py`` takes the same arguments.

The code ships with the package (:mod:`densekit.cli.export`), so that an installed densekit has the command too.
"""
from densekit.cli.export import main

if __name__ == "__main__":
    main()
