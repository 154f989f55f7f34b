"""User-facing errors. Each is one line naming the file and what was expected vs found; the CLI
prints it and exits with code 2 (no traceback). Programming errors stay ordinary exceptions."""


class ValleyError(Exception):
    """Base of every error a user can cause with a bad input."""


class CheckpointError(ValleyError):
    """A folder that is not a valid checkpoint, or whose config and weights disagree."""


class EngineError(ValleyError):
    """An engine folder that is missing, corrupt, tampered with or from another format version."""


class VideoError(ValleyError):
    """A video that cannot be read (the video module defines one subclass per reason)."""


class ContextLengthError(ValleyError):
    """A prompt that does not fit the LLM's context."""


class DataError(ValleyError):
    """A malformed training/eval record."""


class OutputError(ValleyError):
    """An output path that would delete or overwrite something valley-rt did not write."""


class ConfigError(ValleyError, ValueError):
    """A config dict (valley.json, a manifest's "config") with unknown fields or values of the wrong type.

    Also a ValueError, so callers that wrap ValueError into a file-naming error keep doing so."""
