"""What a tracker record contributes to a framework's logs: one number per measure, named ``hessgap/<measure>``."""

from __future__ import annotations

import math

from ..tracking.measures import MEASURES

PREFIX = "hessgap/"


def logged_values(record: dict) -> dict[str, float]:
    """``hessgap/<measure>`` for every measure the record holds a finite number for, and ``hessgap/hvps``.

    A measure without a value (critical sharpness when the update is no descent direction) is left out: the
    record's ``details`` say why, and a logger would draw None as 0 or fail on it.
    """
    values = {f"{PREFIX}{name}": float(record[name]) for name in MEASURES
              if isinstance(record.get(name), (int, float)) and math.isfinite(record[name])}
    values[f"{PREFIX}hvps"] = float(record["hvps"])
    return values
