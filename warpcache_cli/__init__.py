"""warpcache: profile, tune and apply feature caching for DiT video models.

    import warpcache_cli as wc
    wc.apply(pipe, wc.Config.load("config.json"))   # a pipeline or a bare transformer
"""

from warpcache_cli.config import Config, load_config
from warpcache_cli.policy import Action
from warpcache_cli.runtime import CacheSession, apply, remove

__version__ = "0.1.0"
__all__ = ["Action", "CacheSession", "Config", "apply", "load_config", "remove", "__version__"]
