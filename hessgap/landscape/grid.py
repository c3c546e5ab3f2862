"""The grid of a landscape: coordinates along one or two directions, walked row by row.

A 2-D grid has ``len(y)`` rows of ``len(x)`` points (row r holds the points (x[i], y[r])); a 1-D grid is one row.
Rows are the unit of work that a run folder saves, so an interrupted run loses at most the rows in progress.

Every point costs one evaluation of the loss over the whole data, and its values are held (as arrays, rows and
their JSON) until the result is written: a grid whose values would not fit in memory is refused before any
work, and one of more than :data:`WARN_POINTS` points is warned about (see :mod:`.surface`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from numbers import Real

import numpy as np

from .._checks import is_int
from ..errors import HessgapError

#: Grids of more points than this get a warning with their size and a rough time (Li et al.'s plots have
#: 51 × 51 = 2601 points; 10⁴ points are 10⁴ evaluations of the loss over the data, hours on a CPU for MNIST)
WARN_POINTS = 10_000
#: Memory per point beyond the model and the data, rounded up from a measured 1.3 kB (a 2-D grid with test
#: data: coordinates and coefficients, a pass's sums, the rows as Python lists and JSON, the arrays, the VTK text)
BYTES_PER_POINT = 2048
#: Grids whose values would take more than this share of the machine's memory are refused
MEMORY_SHARE = 0.5
#: The memory assumed where the operating system does not say (no ``os.sysconf``)
ASSUMED_MEMORY = 8 * 2**30


@dataclasses.dataclass(frozen=True)
class Grid:
    """Coordinates ``x`` (along the first direction) and ``y`` (along the second; None on a line)."""

    x: np.ndarray
    y: np.ndarray | None

    @property
    def dims(self) -> int:
        return 1 if self.y is None else 2

    @property
    def rows(self) -> int:
        return 1 if self.y is None else len(self.y)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of a surface on this grid: (len(y), len(x)), or (len(x),) on a line."""
        return (len(self.x),) if self.y is None else (len(self.y), len(self.x))

    def points(self, rows) -> np.ndarray:
        """(points, dims) coordinates of the given rows, row after row."""
        rows = list(rows)
        if self.y is None:
            return self.x[:, None].copy()
        xs = np.tile(self.x, len(rows))
        ys = np.repeat(self.y[rows], len(self.x))
        return np.stack([xs, ys], axis=1)


def _steps(value, name: str) -> int:
    if not is_int(value) or value < 2:
        raise HessgapError(f"{name} must be an integer ≥ 2 (points per axis, both ends included), got {value!r}")
    return value


def _interval(value, name: str) -> tuple[float, float]:
    """A span: a number r > 0 for (-r, r), or a pair (low, high) with low < high."""
    if isinstance(value, Real) and not isinstance(value, bool):
        if not math.isfinite(value) or value <= 0:
            raise HessgapError(f"{name} as one number r means (-r, r) and must be finite and > 0, got {value!r}")
        return -float(value), float(value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    ):
        raise HessgapError(f"{name} must be a pair of finite numbers (low, high) or one number r for (-r, r), got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not low < high:
        raise HessgapError(f"{name} must be (low, high) with low < high, got ({low:g}, {high:g}); e.g. (-1, 1)")
    return low, high


def _is_pair_of_pairs(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (tuple, list)) for v in value)


def physical_memory() -> int:
    """The machine's memory in bytes (:data:`ASSUMED_MEMORY` where the operating system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return ASSUMED_MEMORY


def check_size(counts: list[int]) -> None:
    """Refuse a grid whose values need more than :data:`MEMORY_SHARE` of the memory (before any is allocated)."""
    points = math.prod(counts)
    need, memory = points * BYTES_PER_POINT, physical_memory()
    if need > MEMORY_SHARE * memory:
        raise HessgapError(
            f"a grid of {' × '.join(map(str, counts))} = {points:.3g} points needs about {_bytes(need)} for its "
            f"values alone ({BYTES_PER_POINT} bytes a point), more than {MEMORY_SHARE:.0%} of this machine's "
            f"{_bytes(memory)}, and one evaluation of the loss over the data per point; pass fewer steps (a 51 × 51 "
            "grid shows a basin well)")


def _bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.3g} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def make_grid(dims: int, steps, span) -> Grid:
    """The grid for ``steps`` points per axis over ``span``; on a 2-D grid both may be given per axis
    (``steps=(nx, ny)``, ``span=((x_low, x_high), (y_low, y_high))``). A grid too large for the memory is
    refused (:func:`check_size`)."""
    per_axis_steps = dims == 2 and isinstance(steps, (tuple, list))
    if isinstance(steps, (tuple, list)) and (not per_axis_steps or len(steps) != 2):
        raise HessgapError(f"steps must be one integer ≥ 2{' or a pair (nx, ny)' if dims == 2 else ''}, got {steps!r}")
    if _is_pair_of_pairs(span) and dims != 2:
        raise HessgapError(f"span must be (low, high) or one number r for a 1-D landscape, got {span!r}")
    per_axis_spans = _is_pair_of_pairs(span)
    # name the axis only when the value was given for that axis
    counts = [_steps(steps[axis] if per_axis_steps else steps, f"steps (axis {'xy'[axis]})" if per_axis_steps else "steps")
              for axis in range(dims)]
    intervals = [_interval(span[axis] if per_axis_spans else span,
                           f"span (axis {'xy'[axis]})" if per_axis_spans else "span") for axis in range(dims)]
    check_size(counts)
    axes = [np.linspace(low, high, count) for (low, high), count in zip(intervals, counts)]
    return Grid(axes[0], axes[1] if dims == 2 else None)
