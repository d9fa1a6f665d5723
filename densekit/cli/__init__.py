"""What densekit's command-line tools share: the error style (:mod:`densekit.cli.errors`)."""
