"""``$DENSEKIT_CONF`` on every tool's Hydra search path, ahead of densekit's own config tree.

``DENSEKIT_CONF`` names a folder of the user's own YAMLs laid out as densekit's ``conf/`` (``model/my_det.yaml``,
``data/my_data.yaml``, ...); ``densekit.create_model`` / ``list_models`` read the same folder first
(:func:`densekit.modeling.build.config_dirs`), so that a name means the same file in Python and on the command line.

Why a Hydra ``SearchPathPlugin``, registered in-process, rather than a ``hydra.searchpath=[file://...]`` override
added to the command line:

* Hydra appends ``hydra.searchpath`` entries *after* the tool's own configs, so a user's YAML could never shadow
  densekit's of the same name, which ``create_model`` does; a plugin can put the folder first;
* Hydra reads one ``hydra.searchpath`` override only, so an injected one would silently drop the user's own;
* an injected override would be recorded in each run's ``.hydra/overrides.yaml`` as if the user had typed it.

It is registered with ``Plugins.instance().register`` (not shipped in the ``hydra_plugins`` namespace package,
which every Hydra application of the environment scans) so that it acts in densekit's tools only.
"""
from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

#: The provider name of the user's folder in Hydra's search path (``--info searchpath`` shows it).
PROVIDER = "densekit-user-conf"


class UserConfSearchPath(SearchPathPlugin):
    """Puts ``$DENSEKIT_CONF`` just before the tool's own config tree (Hydra's own configs stay first)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # Late: densekit.modeling imports torch, which a tool has imported by the time Hydra composes its config.
        from densekit.modeling.build import user_config_dir

        folder = user_config_dir()  # a folder that does not exist is a user error naming the variable
        if folder is not None:
            search_path.prepend(PROVIDER, f"file://{folder}", anchor=SearchPathQuery(provider="main"))


def register_user_conf_plugin() -> None:
    """Make every Hydra entry point of this process search ``$DENSEKIT_CONF`` (read when each one starts)."""
    Plugins.instance().register(UserConfSearchPath)
