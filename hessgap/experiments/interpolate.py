"""``hessgap interpolate``: Figures 3 and 7 between two saved networks; the result is the parametric
experiment's (``results/parametric.json``), rendered and plotted as it is."""

from __future__ import annotations

from ..errors import HessgapError
from . import parametric
from .parametric import plot, render
from .runs import RunFolder
from .saved import SavedModel, settings_for

__all__ = ["check_pair", "plot", "render", "run"]


def check_pair(a: SavedModel, b: SavedModel) -> None:
    """Refuse two networks that cannot be interpolated: another architecture, or other data."""
    ca, cb = a.result.config, b.result.config
    if (ca.model, ca.width, ca.depth) != (cb.model, cb.width, cb.depth):
        raise HessgapError(
            f"the two models differ ({ca.model} width {ca.width} depth {ca.depth} vs {cb.model} width {cb.width} "
            f"depth {cb.depth}); interpolate between networks of one architecture"
        )
    if ca.dataset != cb.dataset:
        raise HessgapError(f"the two models were trained on different data ({ca.dataset} vs {cb.dataset})")


def run(folder: RunFolder, a: SavedModel, b: SavedModel, settings_changes: dict, data_root=None, eval_batch=1024,
        device="auto") -> dict:
    """Figures 3 and 7 between two saved networks (:func:`.saved.load`): ``a`` at α = 0 (x_SB), ``b`` at
    α = 1 (x_LB). The result names each by its file and sha256."""
    stored = folder.load_result("parametric")
    if stored is not None:
        return stored
    check_pair(a, b)
    settings = settings_for(a.result, data_root, eval_batch, None, device, **settings_changes)
    return parametric.run(folder, settings, model_sb=a.result.model, model_lb=b.result.model,
                          names=(a.describe(), b.describe()))
