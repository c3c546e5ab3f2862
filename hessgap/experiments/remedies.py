"""Experiment 7, Appendix E: large-batch training with each remedy, its gap and its sharpness.

Remedies (implemented in :mod:`hessgap.train.remedies`): ``augment`` (flips where they make sense,
rotations up to 10°, translations up to 0.2 of the image), ``conservative`` (each step solves
min_x mean_B f(x) + λ/2‖x − x_k‖² by 3 ADAM steps), ``adversarial`` (FGSM on the inputs) and
``dynamic`` (the batch size grows from the SB size to the LB size over the first half of training).
Each remedy trains LB networks for every seed; plain SB and LB rows come from the gap experiment's runs.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import _figures as draw
from . import _markdown as md
from . import networks
from .paper import REMEDIES
from .presets import Settings
from .runs import RunFolder

NAME = "remedies"


def dynamic_schedule(settings: Settings, lb: int) -> tuple[int, int, float]:
    """(start, final, growth per epoch): from the SB size to the LB size within half the epochs."""
    ramp = max(1, settings.epochs_for(lb, len(networks.dataset(settings).train)) // 2)
    return settings.sb_batch, lb, (lb / settings.sb_batch) ** (1.0 / ramp)


def run(folder: RunFolder, settings: Settings) -> dict:
    stored = folder.load_result(NAME)
    if stored is not None:
        return stored
    data = networks.dataset(settings)
    lb = settings.lb_size(len(data.train))
    eps = settings.epsilons[0]
    groups: dict[str, list] = {"SB": [], "LB": []}
    for seed in settings.seed_list():
        pair = networks.train_pair(folder, settings, seed)
        groups["SB"].append((seed, pair["sb"]))
        groups["LB"].append((seed, pair["lb"]))
    for remedy in settings.remedies:
        schedule = dynamic_schedule(settings, lb) if remedy == "dynamic" else None
        runs = []
        for seed in settings.seed_list():
            config = networks.train_config(settings, lb, seed, remedy=remedy, batch_schedule=schedule,
                                           epochs=settings.epochs_for(lb, len(data.train)))
            runs.append((seed, networks.train(folder, config, f"lb-{remedy}-seed{seed}", data)))
        groups[f"LB + {remedy}"] = runs
    rows = []
    for name, runs in groups.items():
        evaluations, values, diverged = [], [], []
        for seed, trained in runs:
            if trained.diverged is not None:
                diverged.append({"seed": seed, "epoch": trained.diverged})
                continue
            evaluations.append(networks.final_metrics(trained))
            values.append(networks.sharpness(folder, trained, settings, eps, seed=seed)["value"])
        remedy = name.split(" + ")[1] if " + " in name else None
        paper = REMEDIES.get(remedy, {}) if remedy else {}
        rows.append({
            "name": name,
            "remedy": remedy,
            "models": [t.tag for _, t in runs],
            "train_acc": networks.mean_std(e["train_acc"] for e in evaluations),
            "test_acc": networks.mean_std(e["test_acc"] for e in evaluations),
            "sharpness": networks.mean_std(values),
            "diverged": diverged,
            "paper_test_lb": paper.get("test_lb", {}).get(settings.model),
            "paper_sharpness_lb": paper.get("sharpness_lb_1e-3", {}).get(settings.model),
            "paper_note": paper.get("note"),
        })
    result = {
        "experiment": NAME,
        "settings": settings.to_dict(),
        "epsilon": eps,
        "rows": rows,
        "dynamic_schedule": list(dynamic_schedule(settings, lb)) if "dynamic" in settings.remedies else None,
    }
    result["figures"] = {"remedies": plot(result, folder.figure("remedies")).name}
    folder.save_result(NAME, result)
    return result


# --- its report section and figure --------------------------------------------------------------------

def render(r: dict) -> str:
    rows = []
    for row in r["rows"]:
        status = ", ".join(f"seed {d['seed']} diverged at epoch {d['epoch']}" for d in row.get("diverged", [])) or ""
        paper_cells = [md.fmt(row.get("paper_test_lb")), md.fmt(row.get("paper_sharpness_lb"))]
        if row.get("paper_note"):
            paper_cells = [row["paper_note"], "–"]
        rows.append([row["name"], md.pct(row["train_acc"]), md.pct(row["test_acc"]), md.fmt(row["sharpness"])]
                    + paper_cells + [status])
    extra = ""
    if r.get("dynamic_schedule"):
        start, final, growth = r["dynamic_schedule"]
        extra = f"Dynamic sampling: batch {start} grown ×{growth:.3g} per epoch up to {final}."
    return "\n".join([
        "## 7. Remedies (Appendix E)",
        f"Sharpness: Metric 2.1, full space, ε={r['epsilon']:g}. Paper columns: the paper's LB numbers with the remedy.",
        "",
        md.table(["", "train acc", "test acc", "sharpness", "paper test LB", "paper sharpness LB", "notes"], rows),
        "", extra, "", md.figure(r, "remedies", "remedies"),
    ])


def plot(result: dict, path) -> Path:
    """Appendix E: LB test accuracy and sharpness per remedy, beside plain SB and LB."""
    plt = draw.pyplot()
    rows = result["rows"]
    names = [r["name"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(7.0, 1.3 * len(rows) + 4), 3.6))
    acc = [r["test_acc"][0] if r.get("test_acc") else math.nan for r in rows]
    acc_err = [r["test_acc"][1] if r.get("test_acc") else 0.0 for r in rows]
    left.bar(names, acc, yerr=acc_err, capsize=4, color="tab:green")
    finite = [a for a in acc if not math.isnan(a)]
    left.set_ylim(max(0.0, min(finite, default=0.0) - 5.0), 100.0)
    left.set_ylabel("test accuracy (%)")
    eps = result["epsilon"]
    sharp = draw.positive([r["sharpness"][0] if r.get("sharpness") else None for r in rows])
    sharp_err = [r["sharpness"][1] if r.get("sharpness") else 0.0 for r in rows]
    right.bar(names, sharp, yerr=sharp_err, capsize=4, color="tab:purple")
    right.set_yscale("log")
    right.set_ylabel(f"sharpness ε={eps:g}")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle("Remedies for large-batch training")
    return draw.save(fig, path)
