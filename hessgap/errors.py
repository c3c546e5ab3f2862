"""Errors hessgap raises for bad input; each message names the problem and how to fix it."""


class HessgapError(ValueError):
    """Bad input to a hessgap call (shapes, loaders, devices, values)."""


class NonFiniteError(HessgapError, FloatingPointError):
    """A loss, parameter or vector that should be finite is NaN or infinite."""
