"""``report.md`` of a run folder: the run's tables and figures beside the numbers of Keskar et al. 2017.

The report is rebuilt from the folder's ``config.json`` and ``results/*.json`` alone, so it can be
regenerated at any time (``write_report(path)``) and always shows every finished experiment, also when
a later one failed or was interrupted. It holds a header, the run's settings and one section per result,
rendered by the experiment's own module (see :mod:`hessgap.experiments.registry`), in the registry's order.
"""

from __future__ import annotations

import json
from pathlib import Path

from .._io import read_json, write_text
from . import paper
from ._markdown import table
from .registry import REPORT_ORDER, find


def _settings_block(config: dict) -> str:
    s = config.get("settings", {})
    keys = ["model", "dataset", "width", "depth", "optimizer", "lr", "epochs", "patience", "sb_batch", "lb_batch",
            "lb_fraction", "seed", "seeds", "epsilons", "subspace_dim", "sharpness_solver", "device"]
    rows = [[k, json.dumps(s[k]) if isinstance(s[k], (list, dict)) else s[k]] for k in keys if k in s]
    return table(["setting", "value"], rows) if rows else ""


def render(folder, errors: dict | None = None) -> str:
    """The report text of a run folder; ``errors`` (experiment name → message) are listed at the end."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = read_json(config_path) if config_path.exists() else {}
    results = {}
    results_dir = folder / "results"
    if results_dir.exists():
        for path in sorted(results_dir.glob("*.json")):
            if not path.name.endswith(".parts.json"):
                results[path.stem] = read_json(path)
    parts = [
        f"# hessgap report: `{config.get('command', '?')}`",
        "",
        f"Beside the numbers of {paper.CITATION}. The paper trained full-size networks on MNIST, TIMIT and CIFAR "
        "for about 100 epochs; a run at another scale or on other data is expected to show the same direction "
        "(LB sharper, lower test accuracy), not the same values.",
        "",
        f"hessgap {config.get('hessgap', '?')}, torch {config.get('torch', '?')}, {config.get('machine', '?')}; "
        f"updated {config.get('updated', '?')}.",
        "",
        _settings_block(config),
    ]
    for name in sorted(results, key=lambda n: REPORT_ORDER.index(n) if n in REPORT_ORDER else len(REPORT_ORDER)):
        entry = find(results[name].get("experiment", name))  # rendered as the experiment the result names
        if entry is not None:
            parts += ["", entry.render(results[name])]
    errors = errors or {}
    for name, message in errors.items():
        parts += ["", f"**{name} failed**: {message}"]
    missing = [n for n in config.get("settings", {}).get("experiments", []) if n not in results and n not in errors]
    if missing and config.get("command") in ("reproduce", "demo"):
        parts += ["", f"Not finished yet: {', '.join(missing)} (rerun the same command to resume)."]
    return "\n".join(parts).rstrip() + "\n"


def write_report(folder, errors: dict | None = None) -> Path:
    """Write ``report.md`` in ``folder`` from its config and results (and the failures of this call);
    returns its path."""
    return write_text(Path(folder) / "report.md", render(folder, errors))
