"""Plotting pieces the experiments' figures share: matplotlib's Agg backend, the SB/LB colours, log-axis
values, sharpness beside accuracy, training curves, and the atomic PNG write (:func:`hessgap._io.save_figure`).

Every figure is drawn from a result dict (as saved in ``results/<name>.json``), so it can be redrawn from
the JSON alone.
"""

from __future__ import annotations

import math
from pathlib import Path

from .._io import save_figure

COLORS = {"sb": "tab:blue", "lb": "tab:red"}
LABELS = {"sb": "SB", "lb": "LB"}


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save(fig, path) -> Path:
    """Lay out, write (atomically) and close ``fig``; returns the path of the PNG."""
    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=110)
    finally:
        pyplot().close(fig)


def positive(values):
    """Values usable on a log axis (None and non-positive become NaN, which matplotlib skips)."""
    return [v if v is not None and v > 0 else math.nan for v in values]


def sharpness_beside(ax, xs, rows, epsilons, plot: str, legend_loc: str) -> None:
    """Sharpness curves (one per ε) on a right-hand log axis beside the accuracy on ``ax``, one legend for both;
    ``plot`` is the twin axis' plotting method ("loglog" or "semilogy")."""
    twin = ax.twinx()
    for eps, style in zip(epsilons, ("s-", "^--", "v:")):
        getattr(twin, plot)(xs, positive([r["sharpness"].get(f"{eps:g}") for r in rows]), style, color="tab:red",
                            label=f"sharpness ε={eps:g}")
    twin.set_ylabel("sharpness", color="tab:red")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc=legend_loc)


def history(histories: dict[str, list[dict]], path) -> Path:
    """Training curves (loss and accuracy per epoch) of one or more runs."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for name, rows in histories.items():
        epochs = [r["epoch"] for r in rows]
        color = COLORS.get(name)
        left.semilogy(epochs, positive([r.get("train_loss") for r in rows]), "-", color=color, label=f"{name} train")
        left.semilogy(epochs, positive([r.get("test_loss") for r in rows]), "--", color=color, label=f"{name} test")
        right.plot(epochs, [r.get("train_acc") for r in rows], "-", color=color, label=f"{name} train")
        right.plot(epochs, [r.get("test_acc") for r in rows], "--", color=color, label=f"{name} test")
    left.set_xlabel("epoch")
    left.set_ylabel("cross-entropy")
    right.set_xlabel("epoch")
    right.set_ylabel("accuracy")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    return save(fig, path)
