"""Experiment 6, Figure 6: sharpness against the training loss along SB and LB training, and how far
each run moves from the start, ‖x_SB − x0‖ / ‖x_LB − x0‖ (the paper saw 3 to 10).

The first seed's SB and LB runs measure Metric 2.1 (full space, the settings' first ε) every
``sharpness_every`` epochs while they train; this experiment collects those points.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import HessgapError
from . import _figures as draw
from . import _markdown as md
from . import networks
from .paper import DISTANCE_RATIO_RANGE, FIGURE_NOTES
from .presets import Settings
from .runs import RunFolder

NAME = "along_training"


def run(folder: RunFolder, settings: Settings) -> dict:
    stored = folder.load_result(NAME)
    if stored is not None:
        return stored
    if settings.sharpness_every <= 0:
        raise HessgapError(
            "the along_training experiment needs sharpness measured during training: set --sharpness-every "
            "to a positive number of epochs (0 turns it off)"
        )
    pair = networks.train_pair(folder, settings, settings.seed)
    curves, distances, diverged = {}, {}, {}
    for regime, trained in pair.items():
        history = trained.history
        curves[regime] = [
            {"epoch": h["epoch"], "train_loss": h["train_loss"], "sharpness": h["sharpness"],
             "test_acc": networks.percent(h["test_acc"]) if h.get("test_acc") is not None else None}
            for h in history
            if h.get("sharpness") is not None
        ]
        distances[regime] = [{"epoch": h["epoch"], "distance": h.get("distance_from_start")} for h in history]
        diverged[regime] = trained.diverged
    final_sb = distances["sb"][-1]["distance"] if distances["sb"] else None
    final_lb = distances["lb"][-1]["distance"] if distances["lb"] else None
    result = {
        "experiment": NAME,
        "settings": settings.to_dict(),
        "epsilon": settings.epsilons[0],
        "curves": curves,
        "distances": distances,
        "distance_ratio": final_sb / final_lb if final_sb is not None and final_lb else None,
        "diverged": diverged,
        "models": {regime: trained.tag for regime, trained in pair.items()},
        "paper": FIGURE_NOTES["along_training"],
        "paper_distance_ratio": list(DISTANCE_RATIO_RANGE),
    }
    result["figures"] = {
        "along_training": plot(result, folder.figure("along_training")).name,
        "history": draw.history({r: t.history for r, t in pair.items()}, folder.figure("history")).name,
    }
    folder.save_result(NAME, result)
    return result


# --- its report section and figure --------------------------------------------------------------------

def render(r: dict) -> str:
    out = ["## 6. Sharpness along training (Figure 6)",
           f"Metric 2.1 (full space, ε={r['epsilon']:g}) measured during training. Paper: {r.get('paper', '')}", ""]
    rows = []
    for regime, points in r["curves"].items():
        for p in points:
            rows.append([regime.upper(), p["epoch"], md.fmt(p["train_loss"]), md.fmt(p["sharpness"])])
    out += ["<details><summary>every measurement</summary>", "", md.table(["", "epoch", "train loss", "sharpness"], rows),
            "", "</details>", ""]
    ratio = r.get("distance_ratio")
    low, high = r.get("paper_distance_ratio", (3, 10))
    out.append(f"‖x_SB − x0‖ / ‖x_LB − x0‖ at the end: {md.fmt(ratio, 3)} (paper: {low:g} to {high:g}).")
    out += ["", md.figure(r, "along_training", "sharpness vs training loss"), md.figure(r, "history", "training curves")]
    return "\n".join(out)


def plot(result: dict, path) -> Path:
    """Figure 6: sharpness against the training loss along training (log-log), SB and LB."""
    plt = draw.pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for regime in ("sb", "lb"):
        points = result["curves"].get(regime, [])
        losses = draw.positive([p["train_loss"] for p in points])
        values = draw.positive([p["sharpness"] for p in points])
        ax.loglog(losses, values, "o-", color=draw.COLORS[regime], label=draw.LABELS[regime])
        if points:
            ax.annotate(f"epoch {points[-1]['epoch']}", (losses[-1], values[-1]), fontsize=7)
    ax.invert_xaxis()  # training proceeds to the right, as the loss falls
    ax.set_xlabel("training cross-entropy (falls →)")
    ax.set_ylabel(f"sharpness ε={result['epsilon']:g}")
    ax.set_title("Sharpness along training")
    ax.legend()
    return draw.save(fig, path)
