"""Errors of the command-line front door; each message says what to do about it."""

from headscope.kernels.errors import HeadscopeError


class ConfigError(HeadscopeError, ValueError):
    """A --config file or a command-line option cannot be used (unreadable, unknown key, bad value)."""


class OutputError(HeadscopeError, OSError):
    """The report directory cannot be written."""
