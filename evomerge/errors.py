"""User-facing errors. The CLI prints the message on one line and exits with code 2."""


class EvomergeError(Exception):
    """Base of every error caused by user input (config, checkpoints, parameters)."""


class ConfigError(EvomergeError):
    """A recipe or run config is malformed: unknown key, bad value, missing field."""


class CheckpointError(EvomergeError):
    """A checkpoint cannot be read: missing, truncated, corrupt, pickle without opt-in."""


class ShapeMismatchError(EvomergeError):
    """Sources disagree on tensor names, shapes or architecture."""


class MergeError(EvomergeError):
    """A merge method cannot produce a valid tensor from its inputs (e.g. density gives k = 0)."""
