"""The experiments of Keskar et al. (2017), one module each, run into a :class:`RunFolder`.

Each experiment is one entry of :mod:`hessgap.experiments.registry` and one module that runs it
(``run(folder, settings) -> dict``: the stored result when the folder already holds it, otherwise it trains
or resumes what it needs, measures, saves ``results/<name>.json`` and draws its figures), renders its
section of ``report.md`` and plots its figures. :func:`reproduce` runs a selection of them in the paper's
order and rewrites the report (:mod:`hessgap.experiments.report`) after each.
"""

from __future__ import annotations

import traceback

from ..errors import HessgapError
from . import registry
from .presets import EXPERIMENTS, PRESET_NAMES, Settings, preset
from .report import write_report
from .runs import RunFolder

__all__ = ["EXPERIMENTS", "PRESET_NAMES", "RunFolder", "Settings", "preset", "reproduce", "run_experiment"]


def run_experiment(name: str, folder: RunFolder, settings: Settings) -> dict:
    """Run (or load) one experiment by name."""
    return registry.get(name).load().run(folder, settings)


def reproduce(folder: RunFolder, settings: Settings) -> dict:
    """Run ``settings.experiments`` in order, rewriting ``report.md`` after each.

    An experiment that fails with a :class:`HessgapError` is recorded and the next one still runs (they
    share the trained networks, not each other's results); the returned dict maps each name to its
    result or to ``{"error": message}``.
    """
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
