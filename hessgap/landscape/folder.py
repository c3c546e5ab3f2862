"""A landscape's run folder, laid out like the other commands' and resumed row by row.

    <out>/config.json                   the command, the settings and the fingerprint of the inputs (checked on resume)
    <out>/results/landscape.rows.jsonl  every finished row of the grid, one JSON line each, appended as it finishes
    <out>/results/directions.pt         the directions (dims × n), so a resumed run uses the very same ones
    <out>/results/landscape.json|.npz|.vtp   the finished landscape
    <out>/figures/*.png                 contour, filled contour and 3-D surface (2-D), or the line plot (1-D)

A rerun with the same settings on the same inputs (model, data, loss function, directions: see
:mod:`.fingerprint`) skips the finished rows; anything else raises an error that names what changed instead
of mixing two landscapes in one folder.

The rows file grows by one appended line a row (rewriting it whole after every row made a 300 × 300 grid
15 times slower with a folder than without). A process killed while appending leaves a last line cut short:
it is ignored on resume, and the file rewritten without it before the next row. Folders that keep their rows
in one ``landscape.rows.json`` (earlier versions) resume from it and are moved to the lines.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from .._io import append_text, dumps, jsonable, read_json, read_torch, remove, save_torch, write_json, write_text
from .._version import __version__
from ..errors import HessgapError
from .fingerprint import UNVERIFIABLE

COMMAND = "landscape"
#: config.json's "format". Folders without one were written before hessgap fingerprinted a landscape's inputs
#: by content (a model was its parameters' count, sum and norm, the data not at all): they cannot be verified.
FORMAT = 2


def _setting_changed(key: str, old, new) -> str:
    return f"{key} ({old!r} in the folder, {new!r} now)"


def _input_changed(key: str, old, new) -> str:
    """One difference of the fingerprint (see :mod:`.fingerprint`), in words."""
    if key == "model":
        parts = [{"parameters": "the model's parameters", "buffers": "the model's buffers (BatchNorm running "
                  "statistics)"}[part] for part in ("parameters", "buffers") if (old or {}).get(part) != new.get(part)]
        return " and ".join(parts) or "the model"
    return {
        "others": "the other model(s) given as directions (their parameters or buffers)",
        "directions": "the given direction tensors",
        "data": "the data (the batches' contents, shapes or number: other samples, batch size, max_batches, a "
                "shuffled loader or another number of ranks)",
        "test_data": "the test data",
        "loss_fn": f"the loss function ({old} in the folder, {new} now)",
    }.get(key, f"the {key}")


class LandscapeFolder:
    """``settings`` (plain values, named one by one when they differ) and ``fingerprint`` (digests of the
    inputs, see :mod:`.fingerprint`) decide the numbers: a folder resumes only when both match."""

    def __init__(self, path: str | Path, settings: dict, fingerprint: dict):
        self.path = Path(path)
        self.settings = jsonable(settings)
        self.fingerprint = jsonable(fingerprint)
        self.key = hashlib.sha256(dumps({"settings": self.settings, "fingerprint": self.fingerprint},
                                        sort_keys=True).encode()).hexdigest()
        self.results_dir = self.path / "results"
        self.figures_dir = self.path / "figures"
        self.rows_path = self.results_dir / "landscape.rows.jsonl"
        self.earlier_rows_path = self.results_dir / "landscape.rows.json"  # one JSON object, of earlier versions
        self._rewrite: dict[int, dict] | None = None  # rows to write anew before the next append
        self.directions_path = self.results_dir / "directions.pt"

    def open(self) -> LandscapeFolder:
        """Create the folder, or check that it holds a landscape of the same settings and inputs."""
        config_path = self.path / "config.json"
        if config_path.exists():
            self._check(read_json(config_path))
        write_json(config_path, {
            "command": COMMAND, "format": FORMAT, "settings": self.settings, "fingerprint": self.fingerprint,
            "hessgap": __version__, "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
            "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        return self

    def _check(self, stored: dict) -> None:
        fix = "use a new output folder for this landscape, or delete this one to start it over"
        if stored.get("command") != COMMAND:
            raise HessgapError(f"{self.path} holds a '{stored.get('command')}' run, not a landscape; choose "
                               "another output folder")
        if stored.get("format") != FORMAT:
            raise HessgapError(
                f"{self.path} holds a landscape written by an earlier version of hessgap ({stored.get('hessgap')}), "
                "whose config.json does not say which model, data and loss its rows were computed from, so they "
                f"cannot be verified; {fix}")
        unverifiable = [identity for identity in (stored.get("fingerprint", {}).get("loss_fn"),
                                                  self.fingerprint["loss_fn"])
                        if str(identity).startswith(UNVERIFIABLE)]
        if unverifiable:
            raise HessgapError(
                f"{self.path} holds a landscape that cannot be resumed: its loss function is {unverifiable[0]}, so "
                "nothing tells whether it is the same as the one its rows were computed with; pass a module-level "
                f"function, an nn.Module or a closure over numbers and tensors to make a landscape resumable, and {fix}")
        old_settings, old_fingerprint = stored.get("settings", {}), stored.get("fingerprint", {})
        differences = [_setting_changed(key, old_settings.get(key), self.settings.get(key))
                       for key in sorted(set(old_settings) | set(self.settings))
                       if old_settings.get(key) != self.settings.get(key)]
        differences += [_input_changed(key, old_fingerprint.get(key), self.fingerprint.get(key))
                        for key in self.fingerprint if old_fingerprint.get(key) != self.fingerprint.get(key)]
        if differences:
            raise HessgapError(f"{self.path} holds a landscape computed from other inputs; changed: "
                               f"{'; '.join(differences)}. It resumes only with the very same ones: {fix}")

    def load_directions(self) -> dict | None:
        """{"directions": (dims, n) tensor, "eigenvalues": list or None} saved by an earlier run, or None."""
        if not self.directions_path.exists():
            return None
        stored = read_torch(self.directions_path, "cpu",
                            remedy="delete it to draw the directions again, or the folder to start over")
        if not isinstance(stored, dict) or stored.get("key") != self.key:
            raise HessgapError(f"{self.directions_path} was not computed for this folder's settings and inputs (it "
                               "was copied or replaced); delete it to compute the directions again")
        return stored

    def save_directions(self, directions: torch.Tensor, eigenvalues: list[float] | None) -> None:
        """The directions, with the key of the settings and inputs they were computed from."""
        save_torch(self.directions_path, {"directions": directions.detach().cpu(), "eigenvalues": eigenvalues,
                                          "key": self.key})

    def rows(self) -> dict[int, dict]:
        """The finished rows, by row index (a last line cut short by a crash left out)."""
        if not self.rows_path.exists():
            if not self.earlier_rows_path.exists():
                return {}
            rows = {int(k): v for k, v in read_json(self.earlier_rows_path)["rows"].items()}
            self._rewrite = rows  # moved to the lines with the next row
            return rows
        lines = self.rows_path.read_text(encoding="utf-8").split("\n")
        rows = {}
        for number, line in enumerate(lines, 1):
            if not line:
                continue
            try:
                record = json.loads(line)
                rows[int(record["row"])] = record["values"]
            except (ValueError, KeyError, TypeError) as exc:
                if any(lines[number:]):  # not the last line: damaged otherwise than by a killed append
                    raise HessgapError(f"{self.rows_path} line {number} is damaged ({exc}); delete the file to "
                                       "compute its rows again") from exc
                self._rewrite = rows  # the line a killed process was appending: computed again
        return rows

    def append_rows(self, rows: dict[int, dict]) -> None:
        """Add finished rows to the file (rewriting it first when it ended in a cut line or is of the earlier
        layout)."""
        if self._rewrite is not None:
            rows, self._rewrite = {**self._rewrite, **rows}, None
            write_text(self.rows_path, "".join(_row_line(k, rows[k]) for k in sorted(rows)))
            remove(self.earlier_rows_path)
            return
        append_text(self.rows_path, "".join(_row_line(k, rows[k]) for k in sorted(rows)), durable=True)


def _row_line(row: int, values: dict) -> str:
    """One row as one line of strict JSON (every float exactly: a resumed landscape is bit-identical)."""
    return dumps({"row": row, "values": values}, indent=None) + "\n"
