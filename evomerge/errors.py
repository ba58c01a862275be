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


def one_line(e: BaseException) -> str:
    """`Type: first line of the message`, at most 300 characters: how a caught error is reported in a log line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
