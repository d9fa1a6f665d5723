"""``densekit quantize`` run from a checkout: ``python tools/quantize.py`` takes the same arguments.

The code ships with the package (:mod:`densekit.cli.quantize`), so that an installed densekit has the command too.
"""
from densekit.cli.quantize import main

if __name__ == "__main__":
    main()
