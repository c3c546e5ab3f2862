"""Every experiment hessgap runs and reports, one entry each: adding or renaming an experiment is a matter
of its entry here and its module.

An entry names the module under :mod:`hessgap.experiments` that holds the experiment's three faces side
by side:

- ``run``: for the paper's experiments ``run(folder, settings) -> dict``: the stored result when the run
  folder holds it, otherwise it trains (or resumes) what it needs, measures, saves ``results/<name>.json``
  and draws its figures. For the results of the commands on saved networks (``reproducible=False``),
  ``run`` is the command's work, with the command's own arguments;
- ``render(result) -> str``: the experiment's section of ``report.md``;
- ``plot(result, path) -> Path`` (and any other figure functions): its PNG figures.

The presets' experiments (:data:`EXPERIMENTS`), the command line's ``--experiments`` choices and the order
of the report's sections all come from :data:`REGISTRY`. Modules are imported on first use, so this one
stays light to import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from ..errors import HessgapError


@dataclass(frozen=True)
class Experiment:
    """One experiment: its name (``results/<name>.json``, the name ``--experiments`` takes), its module, the
    number of its section in the report (the paper's experiment number; 0 before them), and whether
    ``hessgap reproduce`` runs it (False: the result of a command on saved networks)."""

    name: str
    module: str
    section: int
    reproducible: bool = True

    def load(self) -> ModuleType:
        """The experiment's module (imported now if it was not yet)."""
        return importlib.import_module(f"{__package__}.{self.module}")

    def render(self, result: dict) -> str:
        """The result's section of report.md."""
        return self.load().render(result)


REGISTRY: tuple[Experiment, ...] = (
    # the paper's experiments, in the order `reproduce` runs them (the section numbers are the paper's)
    Experiment("gap", "gap", 1),
    Experiment("sharpness", "sharpness_tables", 2),
    Experiment("parametric", "parametric", 3),
    Experiment("spectrum", "spectrum", 8),
    Experiment("along_training", "along_training", 6),
    Experiment("sweep", "sweep", 4),
    Experiment("warmstart", "warmstart", 5),
    Experiment("remedies", "remedies", 7),
    # the results of the commands on saved networks, each reported after the experiment it mirrors
    Experiment("train", "model_train", 0, reproducible=False),
    Experiment("model_sharpness", "model_sharpness", 2, reproducible=False),
    Experiment("interpolate", "interpolate", 3, reproducible=False),
    Experiment("model_spectrum", "model_spectrum", 8, reproducible=False),
    # beyond the paper: which sharpness measure predicts the gap (`hessgap correlate`, `hessgap measures`)
    Experiment("correlate", "correlate", 9, reproducible=False),
    Experiment("model_measures", "model_measures", 9, reproducible=False),
)

#: The experiments `hessgap reproduce` runs, in its order (the presets' default selection).
EXPERIMENTS: tuple[str, ...] = tuple(e.name for e in REGISTRY if e.reproducible)
#: Every result kind in the order of the report's sections (registry order within one section).
REPORT_ORDER: tuple[str, ...] = tuple(e.name for e in sorted(REGISTRY, key=lambda e: e.section))

_BY_NAME = {e.name: e for e in REGISTRY}


def find(name: str) -> Experiment | None:
    """The entry of ``name``, or None when no experiment has that name."""
    return _BY_NAME.get(name)


def get(name: str) -> Experiment:
    """The entry of the reproducible experiment ``name``; other names raise, listing the choices."""
    entry = _BY_NAME.get(name)
    if entry is None or not entry.reproducible:
        raise HessgapError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return entry
