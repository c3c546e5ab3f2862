"""Experiment 4, Figure 4: test accuracy and sharpness as the batch size grows."""

from __future__ import annotations

from pathlib import Path

from . import _figures as draw
from . import _markdown as md
from . import networks
from .paper import FIGURE_NOTES
from .presets import Settings
from .runs import RunFolder

NAME = "sweep"


def run(folder: RunFolder, settings: Settings) -> dict:
    """One network per batch size of ``settings.sweep_batches`` (first seed), each evaluated and measured
    at every ε in the full space. Batch sizes larger than the training set are an error. With
    ``lb_epochs`` set, larger batches train for more epochs (see :meth:`Settings.epochs_for`); every run
    trains its epochs also with ``stop="plateau"`` (the paper's Fig. 4: 100 epochs each)."""
    stored = folder.load_result(NAME)
    if stored is not None:
        return stored
    data = networks.dataset(settings)
    for batch in settings.sweep_batches:
        networks.check_batch(batch, len(data.train), "sweep batch size")
    rows = []
    for batch in sorted(settings.sweep_batches):
        config = networks.train_config(settings, batch, settings.seed, epochs=settings.epochs_for(batch, len(data.train)),
                                       fixed_epochs=True)
        trained = networks.train(folder, config, f"b{batch}-seed{settings.seed}", data)
        row = {"batch_size": batch, "model": trained.tag, "diverged": trained.diverged, "sharpness": {}}
        if trained.diverged is None:
            row.update(networks.final_metrics(trained))
            for eps in settings.epsilons:
                row["sharpness"][f"{eps:g}"] = networks.sharpness(folder, trained, settings, eps, seed=settings.seed)["value"]
        rows.append(row)
    result = {
        "experiment": NAME,
        "settings": settings.to_dict(),
        "epsilons": list(settings.epsilons),
        "rows": rows,
        "paper": FIGURE_NOTES["sweep"],
    }
    result["figures"] = {"sweep": plot(result, folder.figure("sweep")).name}
    folder.save_result(NAME, result)
    return result


# --- its report section and figure --------------------------------------------------------------------

def render(r: dict) -> str:
    eps = r["epsilons"]
    rows = []
    for row in r["rows"]:
        if row.get("diverged") is not None:
            rows.append([row["batch_size"], f"diverged at epoch {row['diverged']}", "–"] + ["–"] * len(eps))
        else:
            rows.append([row["batch_size"], md.pct(row["train_acc"]), md.pct(row["test_acc"])]
                        + [md.fmt(row["sharpness"].get(f"{e:g}")) for e in eps])
    return "\n".join([
        "## 4. Batch-size sweep (Figure 4)", f"Paper: {r.get('paper', '')}", "",
        md.table(["batch", "train acc", "test acc"] + [f"sharpness ε={e:g}" for e in eps], rows), "",
        md.figure(r, "sweep", "accuracy and sharpness vs batch size"),
    ])


def plot(result: dict, path) -> Path:
    """Figure 4: test accuracy and sharpness against the batch size."""
    plt = draw.pyplot()
    rows = [r for r in result["rows"] if not r.get("diverged")]
    batches = [r["batch_size"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    ax.semilogx(batches, [r["test_acc"] for r in rows], "ko-", label="test accuracy")
    ax.set_xlabel("batch size")
    ax.set_ylabel("test accuracy (%)")
    draw.sharpness_beside(ax, batches, rows, result["epsilons"], "loglog", legend_loc="center left")
    ax.set_title("Batch-size sweep")
    return draw.save(fig, path)
