"""Files crafted to run code when unpickled, for the tests that hessgap never loads one.

Unpickling an object calls whatever its ``__reduce__`` named: :class:`RunsCode` names ``exec`` with a line
that creates a marker file, so a test sees that code ran if the marker exists afterwards.
"""

from pathlib import Path

import torch


class RunsCode:
    """Pickles as a call of ``exec`` that creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",)


def craft(genuine: Path, crafted: Path, marker: Path, zip_format: bool = True) -> Path:
    """Write ``crafted``: the checkpoint or model file ``genuine`` with one entry more that runs code when loaded
    (everything else intact, so only the refusal of that entry keeps the file from loading)."""
    payload = torch.load(genuine, weights_only=True)
    payload["notes"] = RunsCode(marker)
    crafted.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, crafted, _use_new_zipfile_serialization=zip_format)
    return crafted
