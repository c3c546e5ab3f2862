"""Experiment 1, Table 2: the generalization gap of SB and LB training over several seeds."""

from __future__ import annotations

from .. import plots
from . import networks
from .paper import TABLE2
from .presets import Settings
from .runs import RunFolder

NAME = "gap"
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "distance_from_start")


def run(folder: RunFolder, settings: Settings) -> dict:
    """Train SB and LB for every seed, evaluate both splits in eval mode, and tabulate mean ± std.

    Diverged runs are listed with the epoch at which the loss became non-finite and left out of the
    statistics. Also reports ‖x_SB − x0‖ / ‖x_LB − x0‖ per seed (both start from the same x0).
    """
    stored = folder.load_result(NAME)
    if stored is not None:
        return stored
    rows = []
    for seed in settings.seed_list():
        pair = networks.train_pair(folder, settings, seed)
        for regime, trained in pair.items():
            row = {
                "seed": seed,
                "regime": regime,
                "batch_size": trained.result.config.batch_size,
                "epochs": len(trained.history),
                "diverged": trained.diverged,
                "model": trained.tag,
            }
            if trained.diverged is None:
                row.update(networks.final_metrics(trained))
            rows.append(row)
    summary = summarize(rows)
    result = {
        "experiment": NAME,
        "settings": settings.to_dict(),
        "rows": rows,
        "summary": summary,
        "paper": {k: list(v) for k, v in TABLE2.get(settings.model, {}).items()},
    }
    result["figures"] = {"gap": plots.gap(result, folder.figure("gap")).name}
    folder.save_result(NAME, result)
    return result


def summarize(rows: list[dict]) -> dict:
    """Mean ± std per regime and metric, the test-accuracy gap, and the distance ratio SB / LB."""
    summary = {}
    for regime in ("sb", "lb"):
        mine = [r for r in rows if r["regime"] == regime]
        ok = [r for r in mine if r.get("diverged") is None]
        summary[regime] = {m: networks.mean_std(r.get(m) for r in ok) for m in METRICS}
        summary[regime]["batch_size"] = mine[0]["batch_size"] if mine else None
        summary[regime]["runs"] = len(ok)
        summary[regime]["diverged"] = [r["seed"] for r in mine if r.get("diverged") is not None]
    gaps, ratios = [], []
    for seed in sorted({r["seed"] for r in rows}):
        by = {r["regime"]: r for r in rows if r["seed"] == seed and r.get("diverged") is None}
        if "sb" in by and "lb" in by:
            gaps.append(by["sb"]["test_acc"] - by["lb"]["test_acc"])
            d_sb, d_lb = by["sb"].get("distance_from_start"), by["lb"].get("distance_from_start")
            if d_sb is not None and d_lb:
                ratios.append(d_sb / d_lb)
    summary["test_gap"] = networks.mean_std(gaps)
    summary["distance_ratio"] = networks.mean_std(ratios)
    return summary
