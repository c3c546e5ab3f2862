"""A landscape's run folder, laid out like the other commands' and resumed row by row.

    <out>/config.json                   the command, the settings and the models' fingerprints (checked on resume)
    <out>/results/landscape.rows.json   every finished row of the grid, rewritten atomically after each row
    <out>/results/directions.pt         the directions (dims × n), so a resumed run uses the very same ones
    <out>/results/landscape.json|.npz|.vtp   the finished landscape
    <out>/figures/*.png                 contour, filled contour and 3-D surface (2-D), or the line plot (1-D)

A rerun with the same settings on the same models skips the finished rows; other settings or other models
raise an error instead of mixing two landscapes in one folder.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
from pathlib import Path

import torch

from .._io import jsonable, read_json, read_torch, save_torch, write_json
from .._version import __version__
from ..errors import HessgapError

COMMAND = "landscape"


def fingerprint(model: torch.nn.Module) -> dict:
    """A model's parameter count, sum and norm: enough to notice that a folder belongs to another model."""
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])
    return {"parameters": int(flat.numel()), "sum": float(flat.sum()), "norm": float(flat.norm())}


def _same(stored, current) -> bool:
    if isinstance(stored, dict) and isinstance(current, dict):
        return stored.keys() == current.keys() and all(_same(stored[k], current[k]) for k in stored)
    if isinstance(stored, list) and isinstance(current, list):
        return len(stored) == len(current) and all(_same(a, b) for a, b in zip(stored, current))
    if isinstance(stored, float) or isinstance(current, float):
        # sums over millions of parameters may round differently on another device
        return isinstance(stored, (int, float)) and isinstance(current, (int, float)) and math.isclose(
            stored, current, rel_tol=1e-6, abs_tol=1e-9)
    return stored == current


class LandscapeFolder:
    def __init__(self, path: str | Path, settings: dict, models: dict):
        self.path = Path(path)
        self.settings = jsonable(settings)
        self.models = jsonable(models)
        self.results_dir = self.path / "results"
        self.figures_dir = self.path / "figures"
        self.rows_path = self.results_dir / "landscape.rows.json"
        self.directions_path = self.results_dir / "directions.pt"

    def open(self) -> LandscapeFolder:
        """Create the folder, or check that it holds a landscape of the same settings and models."""
        config_path = self.path / "config.json"
        if config_path.exists():
            stored = read_json(config_path)
            if stored.get("command") != COMMAND:
                raise HessgapError(f"{self.path} holds a '{stored.get('command')}' run, not a landscape; choose "
                                   "another output folder")
            for what, current in (("settings", self.settings), ("models", self.models)):
                old = stored.get(what, {})
                differences = [f"{k}: {old.get(k)!r} in the folder, {current.get(k)!r} now"
                               for k in sorted(set(old) | set(current)) if not _same(old.get(k), current.get(k))]
                if differences:
                    raise HessgapError(
                        f"{self.path} holds a landscape of other {what} ({'; '.join(differences)}); rerun with the "
                        "same ones to resume, or choose another output folder")
        write_json(config_path, {
            "command": COMMAND, "settings": self.settings, "models": self.models, "hessgap": __version__,
            "torch": torch.__version__, "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
            "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        return self

    def load_directions(self) -> dict | None:
        """{"directions": (dims, n) tensor, "eigenvalues": list or None} saved by an earlier run, or None."""
        if not self.directions_path.exists():
            return None
        return read_torch(self.directions_path, "cpu",
                          remedy="delete it to draw the directions again, or the folder to start over")

    def save_directions(self, directions: torch.Tensor, eigenvalues: list[float] | None) -> None:
        save_torch(self.directions_path, {"directions": directions.detach().cpu(), "eigenvalues": eigenvalues})

    def rows(self) -> dict[int, dict]:
        """The finished rows, by row index."""
        if not self.rows_path.exists():
            return {}
        return {int(k): v for k, v in read_json(self.rows_path)["rows"].items()}

    def save_rows(self, rows: dict[int, dict]) -> None:
        write_json(self.rows_path, {"rows": {str(k): rows[k] for k in sorted(rows)}})
