"""JSON-ready results: the ``to_dict()`` / ``to_json()`` every result dataclass shares (see :mod:`hessgap._io`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ._io import dumps, jsonable, write_text


class JsonResult:
    """Mixin for result dataclasses: ``to_dict()`` and ``to_json()``, leaving out the fields named in
    ``_left_out`` (large tensors such as eigenvectors or the HVP values)."""

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
