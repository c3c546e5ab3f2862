"""``hessgap correlate``: which sharpness predicts the generalization gap? A zoo of networks, every measure of
:func:`hessgap.measures` on each, and Kendall's τ and Jiang et al.'s granulated τ per measure.

For each data set of the zoo (:mod:`.zoo`) every member is trained (resumable, under ``models/``), evaluated
on both splits in eval mode, and measured over a fixed subset of its training set (each measurement saved
in ``results/correlate.parts.json`` as it finishes, so a rerun skips it). Members whose training accuracy
stays below the preset's ``min_train_acc``, or that diverged, are excluded with the reason: a measure of a
network that has not fit its training set says nothing about a minimum. Per measure and data set the result
holds τ against the accuracy gap (train − test accuracy, points) and the loss gap (test − train loss), and
Jiang et al.'s granulated τ Ψ over batch size, learning rate and width (seed held fixed), and Dziugaite et
al.'s sign-error over pairs of networks that differ in one of those (its mean over the pairs, per
hyperparameter, and the robust sign-error: the worst hyperparameter's mean), with one scatter grid per data
set. The invariance column is the check of :func:`hessgap.measures` on the first included
member(s) of each data set.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch.utils.data import TensorDataset

from ..measures.api import measures as compute_measures
from ..measures.ranking import granulated_tau, kendall_tau, sign_error
from ..measures.registry import MEASURES
from ..train.config import TrainConfig
from ..train.data import load_dataset, make_loader
from . import _figures as draw
from . import _markdown as md
from . import networks
from .runs import RunFolder
from .zoo import AXES, ZooSettings

NAME = "correlate"
GAPS = ("acc_gap", "loss_gap")
_DATA: dict[tuple, Any] = {}


def dataset_of(settings: ZooSettings, name: str):
    """The data set ``name`` of the zoo, loaded once per process."""
    key = (name, settings.data_root, settings.data_seed)
    if key not in _DATA:
        _DATA[key] = load_dataset(name, root=settings.data_root, seed=settings.data_seed)
    return _DATA[key]


def _config(settings: ZooSettings, member: dict) -> TrainConfig:
    return TrainConfig(model=settings.model, dataset=member["dataset"], data_root=settings.data_root,
                       data_seed=settings.data_seed, batch_size=member["batch_size"],
                       epochs=settings.epochs_for(member["batch_size"]), optimizer=settings.optimizer,
                       lr=member["lr"], seed=member["seed"], width=member["width"], depth=settings.depth,
                       eval_batch_size=settings.eval_batch, device=settings.device, keep_checkpoints=1)


def measure_loader(settings: ZooSettings, name: str):
    """The training samples every member of data set ``name`` is measured over (the same fixed subset)."""
    train_set = dataset_of(settings, name).train
    if settings.measure_samples is not None and settings.measure_samples < len(train_set):
        train_set = TensorDataset(*(t[:settings.measure_samples] for t in train_set.tensors))
    return make_loader(train_set, batch_size=min(settings.eval_batch, len(train_set)), shuffle=False)


def _label(member: dict) -> str:
    return f"{member['dataset']}-b{member['batch_size']}-lr{member['lr']:g}-w{member['width']:g}-s{member['seed']}"


def _train_member(folder: RunFolder, settings: ZooSettings, member: dict) -> dict:
    """Train (or load) one member; its row: the member, the training outcome, and why it is excluded if so."""
    data = dataset_of(settings, member["dataset"])
    networks.check_batch(member["batch_size"], len(data.train))
    trained = networks.train(folder, _config(settings, member), _label(member), data)
    row = dict(member, model=trained.tag, epochs=len(trained.history))
    if trained.diverged is not None:
        row["excluded"] = f"diverged at epoch {trained.diverged}"
        return row
    row.update(networks.final_metrics(trained))
    if row["train_acc"] < settings.min_train_acc:
        row["excluded"] = (f"train accuracy {row['train_acc']:.2f} % < the {settings.min_train_acc:g} % required "
                           f"after {row['epochs']} epochs (more --epochs/--lb-epochs, or a lower --min-train-acc)")
        return row
    row["acc_gap"] = row["train_acc"] - row["test_acc"]
    row["loss_gap"] = row["test_loss"] - row["train_loss"]
    row["_trained"] = trained
    return row


def check_options(settings: ZooSettings) -> None:
    """Every per-measure setting must be one the measure takes: checked before anything trains."""
    for name, options in settings.options.items():
        MEASURES[name].settings(options)


def run(folder: RunFolder, settings: ZooSettings) -> dict:
    """Train the zoo, measure every included member, correlate; the stored result when the folder has it."""
    stored = folder.load_result(NAME)
    if stored is not None:
        return stored
    check_options(settings)
    parts = folder.parts(NAME)
    rows = []
    for dataset in settings.datasets:
        checked = 0
        loader = measure_loader(settings, dataset)
        for member in [m for m in settings.members() if m["dataset"] == dataset]:
            row = _train_member(folder, settings, member)
            trained = row.pop("_trained", None)
            if trained is not None:
                check = checked < settings.invariance_models
                checked += int(check)
                key = f"{trained.tag}/{'checked' if check else 'plain'}"
                if key not in parts:
                    result = compute_measures(trained.model, loader, list(settings.measures), seed=member["seed"],
                                              options=settings.options, check_invariance=check,
                                              progress=folder.progress)
                    folder.log(f"measured {trained.tag} in {result.total_seconds:.1f} s")
                    parts.put(key, result.to_dict())
                row["measures"] = parts.get(key)
            rows.append(row)
    result = {"experiment": NAME, "settings": settings.to_dict(), "rows": rows,
              "correlations": correlations(rows, settings),
              "invariance": {d: invariance([r for r in rows if r["dataset"] == d]) for d in settings.datasets}}
    result["figures"] = {f"scatter_{d}": plot(result, folder.figure(f"correlate_{d}"), d).name
                         for d in settings.datasets if _included(rows, d)}
    folder.save_result(NAME, result)
    return result


def _included(rows: list[dict], dataset: str | None = None) -> list[dict]:
    return [r for r in rows if "excluded" not in r and (dataset is None or r["dataset"] == dataset)]


def _flat(row: dict, measure: str) -> dict:
    """A row with the measure's value beside the axes and gaps, as the τ functions take it."""
    values = row.get("measures", {}).get("values", {})
    return {**{a: row[a] for a in (*AXES, "seed")}, "value": values.get(measure),
            **{g: row.get(g) for g in GAPS}}


def correlations(rows: list[dict], settings: ZooSettings) -> dict:
    """Per data set and measure: n, τ against each gap, granulated τ (Ψ and ψ per axis) against the accuracy
    gap; or the reason there is none."""
    out = {}
    for dataset in settings.datasets:
        included = _included(rows, dataset)
        per = {}
        for name in settings.measures:
            flat = [_flat(r, name) for r in included]
            usable = [f for f in flat if f["value"] is not None and math.isfinite(f["value"])]
            entry = {"n": len(usable)}
            if len(usable) < 3:
                reasons = {r.get("measures", {}).get("not_applicable", {}).get(name) for r in included} - {None}
                entry["reason"] = (f"{len(usable)} usable network(s), τ needs at least 3"
                                   + (f" ({'; '.join(sorted(reasons))})" if reasons else ""))
            else:
                for gap in GAPS:
                    entry[f"tau_{gap}"] = kendall_tau([f["value"] for f in usable], [f[gap] for f in usable])
                granulated = granulated_tau(usable, AXES, "value", "acc_gap", fixed=("seed",))
                entry["granulated"] = granulated["value"]
                entry["psi"] = granulated["psi"]
                signs = sign_error(usable, AXES, "value", "acc_gap", fixed=("seed",))
                entry["sign_error"], entry["robust_sign_error"] = signs["value"], signs["robust"]
                entry["sign_error_by_axis"], entry["sign_error_pairs"] = signs["by_axis"], signs["pairs"]
            per[name] = entry
        out[dataset] = per
    return out


def invariance(rows: list[dict]) -> dict:
    """Per measure: the checked invariance of every member it was checked on (True/False/None) and the
    largest relative change seen."""
    out: dict[str, dict] = {}
    for row in rows:
        m = row.get("measures") or {}
        for name, entry in m.get("invariance", {}).items():
            if "change" not in entry:
                continue
            mine = out.setdefault(name, {"checked": [], "change": 0.0, "declared": entry.get("declared")})
            mine["checked"].append(m["invariant"][name])
            mine["change"] = max(mine["change"], entry["change"])
    for mine in out.values():
        mine["invariant"] = all(mine["checked"]) if mine["checked"] else None
    return out


# --- its report section and figures ----------------------------------------------------------------------

def _inv(entry: dict | None) -> str:
    if not entry or entry.get("invariant") is None:
        return "–"
    return f"{'yes' if entry['invariant'] else 'no'} ({100 * entry['change']:.3g} %)"


def render(r: dict) -> str:
    s = r["settings"]
    out = ["## Which sharpness predicts the generalization gap?",
           f"{s['model']} (depth ×{s['depth']:g}) zoo: batch sizes {s['batch_sizes']}, learning rates {s['lrs']}, "
           f"widths {s['widths']}, seeds {s['seeds']}; ADAM, {s['epochs']} epochs at the smallest batch to "
           f"{s['lb_epochs']} at the largest; members below {s['min_train_acc']:g} % training accuracy are "
           f"excluded. Measured over {s['measure_samples'] or 'all'} training samples. τ: Kendall's τ_b of the "
           "measure against the accuracy gap (train − test, points) and the loss gap (test − train); Ψ: Jiang et "
           "al.'s granulated τ against the accuracy gap over batch size, learning rate and width; sign-error: "
           "Dziugaite et al.'s, over pairs of networks differing in one of those (0: always ranks the pair as the "
           "accuracy gap does, 1: always against it), its mean and, robust, the worst hyperparameter's. Invariant: the "
           "measure's value under a function-preserving ReLU/BatchNorm rescaling (largest relative change).", ""]
    for dataset, per in r["correlations"].items():
        inv = r.get("invariance", {}).get(dataset, {})
        included = _included(r["rows"], dataset)
        total = [row for row in r["rows"] if row["dataset"] == dataset]
        out += [f"### {dataset}: {len(included)} of {len(total)} networks included", ""]
        rows = []
        for name, e in per.items():
            if "reason" in e:
                rows.append([name, "n/a", "n/a", "n/a", "n/a", "n/a", _inv(inv.get(name)), e["reason"]])
            else:
                rows.append([name, md.fmt(e["tau_acc_gap"], 3), md.fmt(e["tau_loss_gap"], 3),
                             md.fmt(e["granulated"], 3), md.fmt(e.get("sign_error"), 3),
                             md.fmt(e.get("robust_sign_error"), 3), _inv(inv.get(name)), ""])
        rows.sort(key=lambda x: -abs(float(x[1])) if x[1] not in ("n/a", "–") else 0)
        out += [md.table(["measure", "τ (acc gap)", "τ (loss gap)", "Ψ", "sign-error", "robust sign-error",
                          "invariant", "note"], rows), "",
                md.figure(r, f"scatter_{dataset}", f"measures against the gap on {dataset}"), ""]
        excluded = [row for row in total if "excluded" in row]
        if excluded:
            out += ["Excluded: " + "; ".join(f"{row['model']}: {row['excluded']}" for row in excluded), ""]
    return "\n".join(out).rstrip()


def plot(result: dict, path, dataset: str) -> Path:
    """One panel per measure: the measure (log axis when positive) against the accuracy gap, coloured by
    batch size, τ in the title."""
    plt = draw.pyplot()
    names = list(result["settings"]["measures"])
    cols = 4
    rows_n = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.3 * cols, 2.6 * rows_n), squeeze=False)
    included = _included(result["rows"], dataset)
    batches = sorted({r["batch_size"] for r in included})
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes.flat, names):
        for r in included:
            value = r.get("measures", {}).get("values", {}).get(name)
            if value is None or not math.isfinite(value):
                continue
            color = cmap(batches.index(r["batch_size"]) / max(1, len(batches) - 1))
            ax.scatter(value, r["acc_gap"], color=color, s=18, marker="o" if r["seed"] % 2 == 0 else "^")
        values = [r.get("measures", {}).get("values", {}).get(name) for r in included]
        positive = [v for v in values if v is not None and v > 0]
        if positive and len(positive) == len([v for v in values if v is not None]) and max(positive) > 10 * min(positive):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
        e = result["correlations"][dataset].get(name, {})
        tau = e.get("tau_acc_gap")
        ax.set_title(f"{name}  τ={tau:.2f}" if tau is not None else f"{name}  (n/a)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("acc gap (points)", fontsize=8)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=cmap(i / max(1, len(batches) - 1)),
                          label=f"batch {b}") for i, b in enumerate(batches)]
    fig.legend(handles=handles, loc="upper right", fontsize=7)
    fig.suptitle(f"Measures against the generalization gap on {dataset} (circles: even seeds, triangles: odd)",
                 fontsize=9)
    return draw.save(fig, path)
