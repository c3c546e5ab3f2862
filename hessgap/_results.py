"""JSON-ready results: the ``to_dict()`` / ``to_json()`` every result dataclass shares (see :mod:`hessgap._io`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ._io import dumps, jsonable, write_text


def _brief(value, depth: int = 0) -> str:
    """A short text for a field: tensors by shape, long lists by their first items and length."""
    if hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, (int, float)):
        return f"<tensor {tuple(value.shape)} {str(value.dtype).replace('torch.', '')}>"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        items = [_brief(v, depth + 1) for v in value[:3]]
        more = f", … {len(value) - 3} more" if len(value) > 3 else ""
        return "[" + ", ".join(items) + more + "]"
    if isinstance(value, str) and len(value) > 80:
        return repr(value[:77] + "...")
    return repr(value)


class JsonResult:
    """Mixin for result dataclasses: ``to_dict()`` and ``to_json()``, leaving out the fields named in
    ``_left_out`` (large tensors such as eigenvectors or the HVP values), and a one-line ``repr`` (declare
    the dataclass with ``repr=False`` so that it is used): the full data is in ``to_dict()``."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={_brief(getattr(self, f.name))}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({fields})"

    _left_out: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """Every field but the large tensors, as plain Python numbers, lists and strings."""
        return {
            field.name: jsonable(getattr(self, field.name))
            for field in dataclasses.fields(self)
            if field.name not in self._left_out
        }

    def to_json(self, path: str | Path | None = None, indent: int | None = 2) -> str:
        """The result as JSON text; also written to ``path`` (atomically) when given."""
        text = dumps(self.to_dict(), indent=indent)
        if path is not None:
            write_text(path, text + "\n")
        return text
