"""Experiment 2, Tables 3 and 4: sharpness of the SB and LB minimizers, full space and random subspace."""

from __future__ import annotations

from tqdm.auto import tqdm

from .. import plots
from . import networks
from .paper import TABLE3, TABLE4
from .presets import Settings
from .runs import RunFolder

NAME = "sharpness"


def spaces(settings: Settings) -> list[tuple[str, int | None]]:
    """("full", None) and, unless disabled, ("subspace", p)."""
    out = [("full", None)]
    if settings.subspace_dim is not None:
        out.append(("subspace", settings.subspace_dim))
    return out


def run(folder: RunFolder, settings: Settings) -> dict:
    """Metric 2.1 at every ε of the settings, in the full space (A = I) and in a random p-dim subspace.

    Each network is measured at its trained weights over the training set; the subspace's random A is
    drawn from the network's seed, so every seed sees a different A. Each value is saved as soon as it
    is measured, so an interrupted run redoes only the missing ones.
    """
    stored = folder.load_result(NAME)
    if stored is not None:
        return stored
    jobs = []
    for seed in settings.seed_list():
        pair = networks.train_pair(folder, settings, seed)
        for regime, trained in pair.items():
            if trained.diverged is None:
                for space, dim in spaces(settings):
                    for eps in settings.epsilons:
                        jobs.append((seed, regime, trained, space, dim, eps))
    rows = []
    for seed, regime, trained, space, dim, eps in tqdm(jobs, desc="sharpness", disable=not folder.progress):
        value = networks.sharpness(folder, trained, settings, eps, subspace_dim=dim, seed=seed)
        rows.append({"seed": seed, "regime": regime, "space": space, "subspace_dim": dim, "epsilon": eps,
                     "model": trained.tag, **value})
    tables = {}
    for space, _ in spaces(settings):
        tables[space] = {
            regime: {
                f"{eps:g}": networks.mean_std(
                    r["value"] for r in rows if r["space"] == space and r["regime"] == regime and r["epsilon"] == eps
                )
                for eps in settings.epsilons
            }
            for regime in ("sb", "lb")
        }
    result = {
        "experiment": NAME,
        "settings": settings.to_dict(),
        "epsilons": list(settings.epsilons),
        "rows": rows,
        "tables": tables,
        "paper": {"full": _paper(TABLE3, settings.model), "subspace": _paper(TABLE4, settings.model)},
    }
    result["figures"] = {"sharpness": plots.sharpness_bars(result, folder.figure("sharpness")).name}
    folder.save_result(NAME, result)
    return result


def _paper(table: dict, model: str) -> dict:
    rows = table.get(model)
    if rows is None:
        return {}
    return {regime: {f"{eps:g}": list(rows[(regime, eps)]) for r, eps in rows if r == regime} for regime in ("sb", "lb")}
