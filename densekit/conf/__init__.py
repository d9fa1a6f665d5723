"""densekit's Hydra config tree (YAML only). This file makes it a package: the tools' ``config_path="../conf"`` is
found as ``pkg://densekit.conf`` once densekit is installed, and Hydra reads a package's configs only if it has an
``__init__.py``. ``$DENSEKIT_CONF`` adds a folder of the user's own YAMLs in the same layout (densekit.cli.user_conf).
"""
