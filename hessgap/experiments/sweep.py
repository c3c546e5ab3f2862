"""Experiment 4, Figure 4: test accuracy and sharpness as the batch size grows."""

from __future__ import annotations

from .. import plots
from . import networks
from .paper import FIGURE_NOTES
from .presets import Settings
from .runs import RunFolder

NAME = "sweep"


def run(folder: RunFolder, settings: Settings) -> dict:
    """One network per batch size of ``settings.sweep_batches`` (first seed), each evaluated and measured
    at every ε in the full space. Batch sizes larger than the training set are an error. With
    ``lb_epochs`` set, larger batches train for more epochs (see :meth:`Settings.epochs_for`)."""
    stored = folder.load_result(NAME)
    if stored is not None:
        return stored
    data = networks.dataset(settings)
    for batch in settings.sweep_batches:
        networks.check_batch(batch, len(data.train), "sweep batch size")
    rows = []
    for batch in sorted(settings.sweep_batches):
        config = networks.train_config(settings, batch, settings.seed, epochs=settings.epochs_for(batch, len(data.train)))
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
    result["figures"] = {"sweep": plots.sweep(result, folder.figure("sweep")).name}
    folder.save_result(NAME, result)
    return result
