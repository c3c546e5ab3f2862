"""The experiments of Keskar et al. (2017), one module each, run into a :class:`RunFolder`.

Each module has ``run(folder, settings) -> dict`` that returns the stored result when the folder
already holds it, and otherwise trains (or resumes) what it needs, measures, saves ``results/<name>.json``
and draws its figures. :func:`reproduce` runs a selection of them in the paper's order.
"""

from __future__ import annotations

import importlib
import traceback

from ..errors import HessgapError
from .presets import EXPERIMENTS, PRESET_NAMES, Settings, preset
from .runs import RunFolder

MODULES = {
    "gap": "gap",
    "sharpness": "sharpness_tables",
    "parametric": "parametric",
    "spectrum": "spectrum",
    "along_training": "along_training",
    "sweep": "sweep",
    "warmstart": "warmstart",
    "remedies": "remedies",
}

__all__ = ["EXPERIMENTS", "PRESET_NAMES", "RunFolder", "Settings", "preset", "reproduce", "run_experiment"]


def run_experiment(name: str, folder: RunFolder, settings: Settings) -> dict:
    """Run (or load) one experiment by name."""
    if name not in MODULES:
        raise HessgapError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    module = importlib.import_module(f".{MODULES[name]}", __name__)
    return module.run(folder, settings)


def reproduce(folder: RunFolder, settings: Settings) -> dict:
    """Run ``settings.experiments`` in order, rewriting ``report.md`` after each.

    An experiment that fails with a :class:`HessgapError` is recorded and the next one still runs (they
    share the trained networks, not each other's results); the returned dict maps each name to its
    result or to ``{"error": message}``.
    """
    from ..report import write_report

    outcome = {}
    for name in settings.experiments:
        done = folder.has_result(name)
        folder.log(f"{'loaded' if done else 'running'} experiment {name}")
        try:
            outcome[name] = run_experiment(name, folder, settings)
        except HessgapError as exc:
            folder.log(f"experiment {name} failed: {exc}")
            outcome[name] = {"error": str(exc)}
        except Exception:
            folder.log(f"experiment {name} failed with an internal error:\n{traceback.format_exc()}")
            write_report(folder.path, _errors(outcome))
            raise
        write_report(folder.path, _errors(outcome))
    return outcome


def _errors(outcome: dict) -> dict:
    return {name: result["error"] for name, result in outcome.items() if "error" in result}
