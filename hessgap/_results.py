"""JSON-ready results: one conversion to plain JSON types for every result and every run file."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch


def jsonable(value: Any) -> Any:
    """Plain JSON types: tuples become lists, tensors and arrays lists, non-finite floats None (strict JSON
    has no NaN or infinity; readers treat None as "no number"), objects with ``to_dict()`` their dict."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return jsonable(value.tolist())
    return value


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
        """The result as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text
