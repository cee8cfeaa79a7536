"""Errors raised before any compute, each naming the config field or file at fault."""


class ConfigError(ValueError):
    """A bad config value. The message starts with the dotted field name, e.g. ``model.n_heads: ...``."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class DataError(RuntimeError):
    """Bad or missing data (corpus file, cache shard, checkpoint). The message names the file."""
