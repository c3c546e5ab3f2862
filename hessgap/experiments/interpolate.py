"""``hessgap interpolate``: Figures 3 and 7 between two saved networks; the result is the parametric
experiment's (``results/parametric.json``), rendered and plotted as it is."""

from __future__ import annotations

from ..errors import HessgapError
from . import parametric
from .parametric import plot, render
from .runs import RunFolder
from .saved import load, model_file, settings_for

__all__ = ["plot", "render", "run"]


def run(folder: RunFolder, path_a, path_b, settings_changes: dict, data_root=None, eval_batch=1024,
        device="auto") -> dict:
    """Figures 3 and 7 between two saved networks: ``path_a`` at α = 0 (x_SB), ``path_b`` at α = 1 (x_LB)."""
    stored = folder.load_result("parametric")
    if stored is not None:
        return stored
    a, b = load(path_a, device), load(path_b, device)
    if (a.config.model, a.config.width, a.config.depth) != (b.config.model, b.config.width, b.config.depth):
        raise HessgapError(
            f"the two models differ ({a.config.model} width {a.config.width} depth {a.config.depth} vs "
            f"{b.config.model} width {b.config.width} depth {b.config.depth}); interpolate between networks of one "
            "architecture"
        )
    if a.config.dataset != b.config.dataset:
        raise HessgapError(f"the two models were trained on different data ({a.config.dataset} vs {b.config.dataset})")
    settings = settings_for(a, data_root, eval_batch, None, device, **settings_changes)
    return parametric.run(folder, settings, model_sb=a.model, model_lb=b.model,
                          names=(str(model_file(path_a)), str(model_file(path_b))))
