"""densekit's command-line tools (``densekit <command>``, :mod:`densekit.cli.command`) and what they share: the error
style (:mod:`densekit.cli.errors`) and ``$DENSEKIT_CONF`` on their Hydra search path (:mod:`densekit.cli.user_conf`).
"""
from .user_conf import register_user_conf_plugin

# Every tool (the benchmarks' too) imports densekit.cli for its error style before Hydra composes its config: the one
# place that gives each of them the user's config folder. Registering reads nothing; the variable is read per run.
register_user_conf_plugin()
