"""The one exception type users see: a message that names the thing at fault.

The CLI prints a ``FuseEvoError`` as one line and exits 2, never a traceback from deep inside
torch or Hydra; anything else is a bug and keeps its traceback.
"""


class FuseEvoError(Exception):
    """Bad input or an unusable environment, explained in the message."""


class ConfigError(FuseEvoError):
    """A configuration value that cannot work (the message names the config key)."""
