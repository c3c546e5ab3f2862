"""Experiment 1, Table 2: the generalization gap of SB and LB training over several seeds."""

from __future__ import annotations

import math
from pathlib import Path

from . import _figures as draw
from . import _markdown as md
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
    result["figures"] = {"gap": plot(result, folder.figure("gap")).name}
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


# --- its report section and figure --------------------------------------------------------------------

def render(r: dict) -> str:
    s, summ = r["settings"], r["summary"]
    sb, lb = summ["sb"], summ["lb"]
    rows = [[
        f"this run: {md.scale(s)}, {sb['runs']}+{lb['runs']} runs",
        md.pct(sb["train_acc"]), md.pct(lb["train_acc"]), md.pct(sb["test_acc"]), md.pct(lb["test_acc"]), md.pct(summ["test_gap"]),
    ]]
    p = r.get("paper") or {}
    if p:
        gap = p["test_sb"][0] - p["test_lb"][0]
        rows.append([md.paper_label(s["model"]), md.pct(p["train_sb"]), md.pct(p["train_lb"]), md.pct(p["test_sb"]),
                     md.pct(p["test_lb"]), f"{gap:.2f}"])
    out = [
        "## 1. Generalization gap (Table 2)",
        f"SB batch {sb['batch_size']}, LB batch {lb['batch_size']}, {_stopping(s)}; accuracy in % (mean ± std over "
        "seeds, eval mode, whole splits).",
        "",
        md.table(["", "train SB", "train LB", "test SB", "test LB", "gap (test SB − LB)"], rows),
        "",
        f"‖x_SB − x0‖ / ‖x_LB − x0‖: {md.fmt(summ.get('distance_ratio'))} (paper: 3 to 10).",
    ]
    for regime in ("sb", "lb"):
        if summ[regime]["diverged"]:
            out.append(f"**{regime.upper()} diverged** for seeds {summ[regime]['diverged']} (left out of the statistics).")
    per_seed = [[row["seed"], row["regime"].upper(), row["batch_size"], row["epochs"],
                 md.pct(row.get("train_acc")), md.pct(row.get("test_acc")), md.fmt(row.get("train_loss")),
                 md.fmt(row.get("distance_from_start")),
                 f"diverged at epoch {row['diverged']}" if row.get("diverged") is not None else "ok"]
                for row in r["rows"]]
    out += ["", "<details><summary>per run</summary>", "",
            md.table(["seed", "regime", "batch", "epochs", "train acc", "test acc", "train loss", "‖x − x0‖", "status"],
                   per_seed), "", "</details>", "", md.figure(r, "gap", "accuracy of SB and LB")]
    return "\n".join(out)


def _stopping(s: dict) -> str:
    """How the runs were stopped, in a few words."""
    if s.get("stop", "epochs") == "plateau":
        return (f"each trained until its training loss had not improved for {s.get('patience')} epochs "
                f"(at most {s.get('max_epochs')})")
    lb_epochs = s.get("lb_epochs") or s.get("epochs")
    text = f"{s.get('epochs')} epochs" + (f" (LB {lb_epochs})" if lb_epochs != s.get("epochs") else "")
    return text + (f", or until the loss stalled for {s['patience']} epochs" if s.get("patience") else "")


def plot(result: dict, path) -> Path:
    """Figure for Table 2: train and test accuracy of SB and LB, mean ± std over seeds."""
    plt = draw.pyplot()
    summary = result["summary"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    groups = ["train_acc", "test_acc"]
    for offset, regime in ((-0.18, "sb"), (0.18, "lb")):
        stats = [summary[regime].get(g) for g in groups]
        means = [s[0] if s else math.nan for s in stats]
        stds = [s[1] if s else 0.0 for s in stats]
        ax.bar([i + offset for i in range(len(groups))], means, width=0.34, yerr=stds, capsize=4,
               color=draw.COLORS[regime], label=f"{draw.LABELS[regime]} (batch {summary[regime]['batch_size']})")
    ax.set_xticks(range(len(groups)), ["train accuracy", "test accuracy"])
    ax.set_ylabel("accuracy (%)")
    lows = [s[0] for r in ("sb", "lb") for g in groups if (s := summary[r].get(g))]
    ax.set_ylim(max(0.0, min(lows, default=0.0) - 5.0), 100.5)
    ax.set_title(f"Generalization gap ({result['settings']['model']} on {result['settings']['dataset']})")
    ax.legend(loc="lower right")
    return draw.save(fig, path)
