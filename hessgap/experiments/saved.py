"""Saved networks, as the commands on them find them: ``hessgap sharpness``, ``spectrum`` and ``interpolate``
(:mod:`.model_sharpness`, :mod:`.model_spectrum`, :mod:`.interpolate`) measure networks that ``hessgap train``
(:mod:`.model_train`) or an experiment saved.

A network saved by ``hessgap train`` (``<out>/model.pt``, written by :meth:`TrainResult.save`) carries
its configuration, so the data it was trained on is found again from the file alone (``data_root`` can
be overridden when the data moved).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import HessgapError
from ..train.checkpoint import list_checkpoints
from ..train.config import resolve_device
from ..train.result import TrainResult
from .presets import Settings

MODEL_FILE = "model.pt"


def model_file(path) -> Path:
    """The saved-model file for ``path``: the file itself, ``model.pt`` in a ``hessgap train`` folder, or
    the latest checkpoint of a training run folder (``<run>/models/<tag>`` of an experiment)."""
    path = Path(path)
    if path.is_dir():
        candidate = path / MODEL_FILE
        if candidate.is_file():
            return candidate
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


def load(path, device: str = "auto") -> TrainResult:
    """A :class:`TrainResult` read from ``path`` (a model file or a ``hessgap train`` folder)."""
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
