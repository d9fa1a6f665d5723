"""``python -m densekit <command> [arguments]``: the ``densekit`` command (:mod:`densekit.cli.command`)."""
from densekit.cli.command import main

if __name__ == "__main__":
    main()
