"""The error every layer raises for bad input (a config key, a data file, a launch environment): the trainer and the
tools exit 2 with its one-line message. A leaf, so that data/ (below config) can raise it too."""


class ConfigError(ValueError):
    """Input that cannot run; the message names the key, file or line."""
