"""``densekit eval`` run from a checkout: ``python tools/eval.py`` takes the same arguments.

The code ships with the package (:mod:`densekit.cli.eval`), so that an installed densekit has the command too.
"""
from densekit.cli.eval import main

if __name__ == "__main__":
    main()
