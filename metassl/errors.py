"""Errors that carry a message meant for the user (the CLI prints them and exits 2)."""


class MetasslError(Exception):
    """Base class: bad user input that the CLI reports without a traceback."""


class ConfigError(MetasslError, ValueError):
    """A config file, key, value or override is invalid."""


class DataError(MetasslError, ValueError):
    """A dataset is missing, unreadable, or too small for the requested episodes."""


class CheckpointError(MetasslError, ValueError):
    """A checkpoint is missing, corrupt, or does not match the model."""


class StorageError(MetasslError, OSError):
    """Object storage (s3://, gs://, ...) is unreachable, refuses access, or lacks credentials."""
