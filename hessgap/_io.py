"""The one way hessgap writes files: atomically (temporary file in the same folder, then a rename), and
one JSON convention for every result, run file and checkpoint summary.

An interrupted write never leaves a half-written file under the real name: the old file (or none) stays
until the new one is complete and flushed to disk.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import HessgapError


def jsonable(value: Any) -> Any:
    """Plain JSON types: tuples become lists, tensors and arrays lists, non-finite floats None (strict JSON
    has no NaN or infinity; readers treat None as "no number"), objects with ``to_dict()`` their dict,
    dtypes, devices and paths their string."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return jsonable(value.tolist())
    module = type(value).__module__ or ""
    if module.startswith("torch"):  # torch.dtype, torch.device
        return str(value)
    return value


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, flush it to disk and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def dumps(data: Any, indent: int | None = 2, sort_keys: bool = False) -> str:
    """``data`` as strict JSON text (see :func:`jsonable`)."""
    return json.dumps(jsonable(data), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as strict JSON (2-space indent, trailing newline), atomically."""
    return write_text(path, dumps(data) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or damaged file raises a :class:`HessgapError` that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HessgapError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise HessgapError(f"{path} is not valid JSON ({exc}); the file is damaged: delete it to recompute that part") from exc


def save_torch(path: str | Path, payload: Any) -> Path:
    """``torch.save`` the payload atomically."""
    import torch

    return atomic_write(path, lambda handle: torch.save(payload, handle))


def save_figure(figure, path: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG, atomically (rendered into memory first)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return write_bytes(path, buffer.getvalue())
