"""Saved networks, as the commands on them find them: ``hessgap sharpness``, ``spectrum`` and ``interpolate``
(:mod:`.model_sharpness`, :mod:`.model_spectrum`, :mod:`.interpolate`) measure networks that ``hessgap train``
(:mod:`.model_train`) or an experiment saved.

A network saved by ``hessgap train`` (``<out>/model.pt``, written by :meth:`TrainResult.save`) carries
its configuration, so the data it was trained on is found again from the file alone (``data_root`` can
be overridden when the data moved). A measurement records the sha256 of the file it measured
(:class:`SavedModel`): a run folder compares it, so a network trained further is measured afresh rather
than answered with the old number.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import HessgapError
from ..train.checkpoint import CHECKPOINT_DIR, list_checkpoints
from ..train.config import resolve_device
from ..train.result import TrainResult
from .presets import Settings

MODEL_FILE = "model.pt"


@dataclass
class SavedModel:
    """A saved network as it was read: the file, the sha256 of its bytes, and the trained network."""

    file: Path
    sha256: str
    result: TrainResult

    @property
    def label(self) -> str:
        """A short name for folders: the run folder's name for its model.pt, ``<run>-epoch_0003`` for a checkpoint,
        the file's stem otherwise."""
        file = self.file.resolve()
        if file.parent.name == CHECKPOINT_DIR:
            return f"{file.parent.parent.name}-{file.stem}".lstrip("-")
        if file.name == MODEL_FILE and file.parent.name:
            return file.parent.name
        return file.stem or "model"

    def describe(self) -> str:
        """The file and a prefix of its digest, as results and reports name what they measured."""
        return f"{self.file} (sha256 {self.sha256[:12]})"


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


def file_sha256(path, chunk_bytes: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read in chunks (a checkpoint may be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path) -> tuple:
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def load(path, device: str = "auto") -> SavedModel:
    """The network saved at ``path`` (a model file, a ``hessgap train`` folder or a training run folder)
    with the sha256 of the file it was read from."""
    file = model_file(path)
    map_location = resolve_device(device)
    for _ in range(3):
        # a run writing the file meanwhile replaces it (atomically): read again until digest and weights agree
        before = _stamp(file)
        sha256 = file_sha256(file)
        result = TrainResult.load(file, map_location=map_location)
        if _stamp(file) == before:
            return SavedModel(file=file, sha256=sha256, result=result)
    raise HessgapError(f"{file} changed while it was read, three times; is a training run writing it? Wait for it "
                       "to finish")


def settings_for(result, data_root: str | None = None, eval_batch: int = 1024, max_batches: int | None = None,
                 device: str = "auto", **extra) -> Settings:
    """Settings describing a saved network and its data (for evaluation, sharpness, spectra)."""
    config = result.config
    return Settings(
        model=config.model, dataset=config.dataset, data_root=data_root if data_root is not None else config.data_root,
        data_seed=getattr(config, "data_seed", 0), width=config.width, depth=config.depth,
        preprocess=getattr(config, "preprocess", "standardize"), init=getattr(config, "init", "pytorch"),
        conv_dropout=getattr(config, "conv_dropout", False),
        eval_batch=eval_batch, sharpness_batches=max_batches, seeds=1, experiments=(), device=device, **extra,
    )
