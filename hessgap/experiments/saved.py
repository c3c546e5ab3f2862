"""Commands on saved networks: train one, then measure its sharpness or spectrum, or interpolate two.

A network saved by ``hessgap train`` (``<out>/model.pt``, written by :meth:`TrainResult.save`) carries
its configuration, so the data it was trained on is found again from the file alone (``data_root`` can
be overridden when the data moved).
"""

from __future__ import annotations

from pathlib import Path

from .. import plots
from ..errors import HessgapError
from . import networks, parametric
from .presets import Settings
from .runs import RunFolder

MODEL_FILE = "model.pt"


def model_file(path) -> Path:
    """The saved-model file for ``path``: the file itself, ``model.pt`` in a ``hessgap train`` folder, or
    the latest checkpoint of a training run folder (``<run>/models/<tag>`` of an experiment)."""
    path = Path(path)
    if path.is_dir():
        candidate = path / MODEL_FILE
        if candidate.is_file():
            return candidate
        from ..train.checkpoint import list_checkpoints

        checkpoints = list_checkpoints(path)
        if checkpoints:  # a training run folder (models/<tag> of an experiment): its latest epoch
            return checkpoints[max(checkpoints)]
        raise HessgapError(
            f"{path} is a folder without {MODEL_FILE} or checkpoints/; give a file saved by `hessgap train`, the "
            f"folder `hessgap train --out` wrote, or a training run folder under an experiment's models/"
        )
    if not path.is_file():
        raise HessgapError(f"no saved model at {path}; give the model.pt that `hessgap train` wrote, or its folder")
    return path


def load(path, device: str = "auto"):
    """A :class:`TrainResult` read from ``path`` (a model file or a ``hessgap train`` folder)."""
    from ..train.config import resolve_device
    from ..train.result import TrainResult

    return TrainResult.load(model_file(path), map_location=resolve_device(device))


def settings_for(result, data_root: str | None = None, eval_batch: int = 1024, max_batches: int | None = None,
                 device: str = "auto", **extra) -> Settings:
    """Settings describing a saved network and its data (for evaluation, sharpness, spectra)."""
    config = result.config
    return Settings(
        model=config.model, dataset=config.dataset, data_root=data_root if data_root is not None else config.data_root,
        data_seed=getattr(config, "data_seed", 0), width=config.width, depth=config.depth,
        eval_batch=eval_batch, sharpness_batches=max_batches, seeds=1, experiments=(), device=device, **extra,
    )


def train_one(folder: RunFolder, config) -> dict:
    """Train ``config`` into the run folder (checkpoints there; resumes), save ``model.pt``, write the result."""
    from ..train.loop import train

    folder.log(f"training {config.model} on {config.dataset}, batch {config.batch_size}, seed {config.seed}")
    result = train(config, out_dir=folder.path, progress=folder.progress)
    result.save(folder.path / MODEL_FILE)
    summary = result.to_dict()
    out = {
        "experiment": "train",
        "model": f"{config.model} on {config.dataset} (batch {config.batch_size}, seed {config.seed})",
        "config": summary["config"],
        "final": {k: v for k, v in summary["final"].items()},
        "history": summary["history"],
        "diverged": result.diverged,
        "stopped_early": result.stopped_early,
        "num_parameters": summary["num_parameters"],
        "model_file": MODEL_FILE,
    }
    out["figures"] = {"history": plots.history({"run": result.history}, folder.figure("history")).name}
    folder.save_result("train", out)
    return out


def measure_sharpness(folder: RunFolder, path, epsilons, subspace_dim=None, solver="box-ascent", seed=0,
                      data_root=None, eval_batch=1024, max_batches=None, device="auto") -> dict:
    """Metric 2.1 of a saved network at each ε, full space (and a random subspace when ``subspace_dim``)."""
    import hessgap

    stored = folder.load_result("model_sharpness")
    if stored is not None:
        return stored
    result = load(path, device)
    settings = settings_for(result, data_root, eval_batch, max_batches, device)
    loader = networks.analysis_loader(settings)
    parts = folder.parts("model_sharpness")
    measurements = []
    for dim in [None] + ([subspace_dim] if subspace_dim else []):
        for eps in epsilons:
            key = f"{'full' if dim is None else f'sub{dim}'}/eps{eps:g}"

            def measure():
                value = hessgap.sharpness(result.model, loader, epsilon=eps, subspace_dim=dim, solver=solver,
                                          seed=seed, progress=folder.progress)
                folder.log(f"sharpness {key}: {value.value:.5g}")
                return value.to_dict()

            entry = dict(parts.compute(key, measure))
            entry["space"] = "full" if dim is None else f"{dim}-dim subspace"
            entry["epsilon"] = eps
            measurements.append(entry)
    out = {
        "experiment": "model_sharpness",
        "model": str(model_file(path)),
        "data": f"training set of {settings.dataset} ({len(loader.dataset)} samples)",
        "measurements": measurements,
    }
    folder.save_result("model_sharpness", out)
    return out


def measure_spectrum(folder: RunFolder, path, k=10, with_trace=False, with_density=False, probes=64, seed=0,
                     data_root=None, eval_batch=1024, max_batches=None, device="auto") -> dict:
    """Top-k Hessian eigenvalues of a saved network; optionally its trace and spectral density."""
    import hessgap

    stored = folder.load_result("model_spectrum")
    if stored is not None:
        return stored
    result = load(path, device)
    settings = settings_for(result, data_root, eval_batch, max_batches, device)
    loader = networks.analysis_loader(settings)
    parts = folder.parts("model_spectrum")
    out = {"experiment": "model_spectrum", "model": str(model_file(path)),
           "data": f"training set of {settings.dataset} ({len(loader.dataset)} samples)", "figures": {}}
    eig = parts.compute(f"eigenvalues/k{k}", lambda: _eigen(hessgap, result.model, loader, k, seed, folder.progress))
    out["eigenvalues"] = eig["eigenvalues"]
    out["eigen"] = eig
    if with_trace:
        out["trace"] = parts.compute(
            f"trace/p{probes}",
            lambda: hessgap.trace(result.model, loader, num_probes=probes, seed=seed, progress=folder.progress).to_dict())
    if with_density:
        def run_density():
            dens = hessgap.density(result.model, loader, seed=seed, progress=folder.progress,
                                   save_png=str(folder.figure("density")))
            return dens.to_dict()

        out["density"] = parts.compute("density", run_density)
        out["figures"]["density"] = "density.png"
    folder.save_result("model_spectrum", out)
    return out


def _eigen(hessgap, model, loader, k, seed, progress) -> dict:
    found = hessgap.eigenvalues(model, loader, k=k, seed=seed, progress=progress)
    out = found.to_dict()
    out.pop("eigenvectors", None)
    out["eigenvalues"] = [float(v) for v in found.eigenvalues]
    return out


def interpolate(folder: RunFolder, path_a, path_b, settings_changes: dict, data_root=None, eval_batch=1024,
                device="auto") -> dict:
    """Figures 3 and 7 between two saved networks: ``path_a`` at α = 0 (x_SB), ``path_b`` at α = 1 (x_LB)."""
    stored = folder.load_result("parametric")
    if stored is not None:
        return stored
    a, b = load(path_a, device), load(path_b, device)
    if (a.config.model, a.config.width, a.config.depth) != (b.config.model, b.config.width, b.config.depth):
        raise HessgapError(
            f"the two models differ ({a.config.model} width {a.config.width} depth {a.config.depth} vs "
            f"{b.config.model} width {b.config.width} depth {b.config.depth}); interpolate between networks of one "
            "architecture"
        )
    if a.config.dataset != b.config.dataset:
        raise HessgapError(f"the two models were trained on different data ({a.config.dataset} vs {b.config.dataset})")
    settings = settings_for(a, data_root, eval_batch, None, device, **settings_changes)
    return parametric.run(folder, settings, model_sb=a.model, model_lb=b.model,
                          names=(str(model_file(path_a)), str(model_file(path_b))))
