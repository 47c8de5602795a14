"""Errors raised by headscope.probe; each message says what to do about it."""

from headscope.kernels.errors import HeadscopeError


class ModelLoadError(HeadscopeError, ValueError):
    """The model spec could not be resolved or loaded."""


class DeviceError(HeadscopeError, RuntimeError):
    """The requested device is not available."""


class InputError(HeadscopeError, ValueError):
    """A prompt or token batch cannot be run (empty, too long, malformed)."""


class HeadIndexError(HeadscopeError, IndexError):
    """A layer or head index is out of range for the model."""


class PatternMemoryError(HeadscopeError, MemoryError):
    """Full attention patterns were requested that would not fit in memory."""


class RecordingError(HeadscopeError, RuntimeError):
    """A recording was used in a way it cannot support (e.g. mixed sequence lengths)."""
