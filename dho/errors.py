"""Errors that describe a problem with the user's input, files or environment.

The CLI prints them as one line (no traceback) and exits with status 2. Every message says
which file / shard / key is involved and what to do about it.
"""


class DhoError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class DatasetError(DhoError):
    """A dataset folder, manifest or shard is missing, inconsistent or corrupt."""


class CacheError(DhoError):
    """A teacher cache is missing, incomplete, of another schema, or built for other data."""


class ConfigError(DhoError):
    """An option or config value is invalid or inconsistent with the inputs."""
