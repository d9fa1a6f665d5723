"""``densekit predict`` run from a checkout: ``python tools/predict.py`` takes the same arguments.

The code ships with the package (:mod:`densekit.cli.predict`), so that an installed densekit has the command too.
"""
from densekit.cli.predict import main

if __name__ == "__main__":
    main()
