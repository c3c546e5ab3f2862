"""``hessgap sharpness``: Metric 2.1 of a saved network at each ε, in the full space and optionally in a
random subspace, over its training set."""

from __future__ import annotations

from functools import partial

from ..train.sharpness_log import check_sharpness_epsilons, measure_sharpness
from . import _markdown as md
from . import networks
from .runs import RunFolder
from .saved import SavedModel, settings_for

NAME = "model_sharpness"


def run(folder: RunFolder, saved: SavedModel, epsilons, subspace_dim=None, solver="auto", seed=0, data_root=None,
        eval_batch=1024, max_batches=None, device="auto", batchnorm="eval") -> dict:
    """Metric 2.1 of a saved network (:func:`.saved.load`) at each ε, full space (and a random subspace when
    ``subspace_dim``), BatchNorm on running (``batchnorm="eval"``) or batch statistics (``"train"``)."""
    stored = folder.load_result(NAME)
    if stored is not None:
        return stored
    settings = settings_for(saved.result, data_root, eval_batch, max_batches, device)
    loader = networks.analysis_loader(settings)
    # every ε before the first is measured and kept: a later one that cannot be would leave the folder holding
    # results of settings the corrected command does not ask for
    check_sharpness_epsilons(saved.result.model, loader, epsilons, batchnorm=batchnorm)
    parts = folder.parts(NAME)
    measurements = []
    for dim in [None] + ([subspace_dim] if subspace_dim else []):
        for eps in epsilons:
            key = f"{'full' if dim is None else f'sub{dim}'}/eps{eps:g}"
            measure = partial(_measure, folder, key, saved.result.model, loader, eps, dim, solver, seed, batchnorm)
            entry = dict(parts.compute(key, measure))
            entry["space"] = "full" if dim is None else f"{dim}-dim subspace"
            entry["epsilon"] = eps
            measurements.append(entry)
    out = {
        "experiment": NAME,
        "model": str(saved.file),
        "model_sha256": saved.sha256,
        "data": f"training set of {settings.dataset} ({len(loader.dataset)} samples)",
        "measurements": measurements,
    }
    folder.save_result(NAME, out)
    return out


def _measure(folder: RunFolder, key: str, model, loader, epsilon: float, subspace_dim, solver: str, seed: int,
             batchnorm: str) -> dict:
    value = measure_sharpness(model, loader, epsilon, subspace_dim=subspace_dim, seed=seed, progress=folder.progress,
                              solver=solver, batchnorm=batchnorm)
    folder.log(f"sharpness {key}: {value.value:.5g}")
    return value.to_dict()


# --- its report section ------------------------------------------------------------------------------

def render(r: dict) -> str:
    rows = [[m["space"], md.fmt(m["epsilon"]), md.fmt(m["value"]), md.fmt(m["loss"]), md.fmt(m.get("max_loss")),
             m.get("solver", "–"), md.fmt(m.get("seconds"), 3)] for m in r["measurements"]]
    return "\n".join([
        f"## Sharpness of {r['model']}",
        f"Model file sha256: {r.get('model_sha256', '–')}. Data: {r.get('data', '–')}.",
        "",
        md.table(["space", "ε", "sharpness", "f(x)", "max f", "solver", "seconds"], rows),
    ])
