"""Errors hessgap raises for bad input; each message names the problem and how to fix it."""


class HessgapError(ValueError):
    """Bad input to a hessgap call (shapes, loaders, devices, values)."""


class NonFiniteError(HessgapError, FloatingPointError):
    """A loss, parameter or vector that should be finite is NaN or infinite."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (torch's load_state_dict errors span several; the command line prints one)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
