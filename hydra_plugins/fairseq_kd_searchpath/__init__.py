"""Hydra search-path plugin: ``fairseq-hydra-train --config-name thin_deep`` from any directory.

hydra 1.0 discovers plugins in the ``hydra_plugins`` namespace package. This one appends the
installed ``fairseq_kd/config`` folder to the config search path, found without importing
fairseq_kd (the scan runs for every hydra app; importing the plugin must stay cheap).
"""

import importlib.util
import os

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


def fairseq_kd_config_dir() -> str:
    spec = importlib.util.find_spec("fairseq_kd")
    if spec is None or not spec.submodule_search_locations:
        return ""
    return os.path.join(list(spec.submodule_search_locations)[0], "config")


class FairseqKDSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        config_dir = fairseq_kd_config_dir()
        if config_dir and os.path.isdir(config_dir):
            search_path.append(provider="fairseq_kd", path=f"file://{config_dir}")
