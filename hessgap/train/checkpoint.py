"""Per-epoch checkpoints of a training run: atomic writes, clear errors on damaged files.

A run folder holds ``checkpoints/epoch_0001.pt`` … (model, optimizer, RNG states, history, x0 and the
configuration: everything to resume bit-exactly) and ``history.json`` (the per-epoch metrics, readable
without torch). Both are written through :mod:`hessgap._io` (a temporary file in the same folder, renamed
into place), so an interrupted write never leaves a half-written checkpoint under the real name.
A checkpoint holds tensors and plain data only (dicts, lists, numbers, strings: the configuration as its
dict, the RNG states as tensors) and is read back as such (:func:`hessgap._io.read_torch`): a file holding
any other object is refused, since unpickling it could run code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .._io import read_torch, save_torch
from ..errors import HessgapError

CHECKPOINT_DIR = "checkpoints"
HISTORY_FILE = "history.json"
_PATTERN = re.compile(r"^epoch_(\d+)\.pt$")


def checkpoint_path(out_dir: str | Path, epoch: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"epoch_{int(epoch):04d}.pt"


def list_checkpoints(out_dir: str | Path) -> dict[int, Path]:
    """{epoch: path} of the checkpoints in a run folder, in epoch order."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _PATTERN.match(path.name)
        if match and path.is_file():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """``torch.save`` the payload atomically (temporary file + rename), as tensors and plain data."""
    save_torch(path, payload)


#: what rebuilding the trained network needs: in every checkpoint and in a model.pt of TrainResult.save
RESULT_ENTRIES = ("model", "x0", "config", "input_shape", "num_classes")
#: what resuming a run from its latest checkpoint needs besides
RESUME_ENTRIES = (*RESULT_ENTRIES, "epoch", "optimizer", "rng", "history", "best_loss", "bad_epochs", "stopped_early")
_RNG_ENTRIES = ("torch", "augment")


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu",
                    needs: tuple[str, ...] = ("model",)) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a damaged file, or one without the entries
    in ``needs`` (:data:`RESULT_ENTRIES`, :data:`RESUME_ENTRIES`), raises an error naming it and the fix."""
    path = Path(path)
    if not path.is_file():
        raise HessgapError(f"checkpoint {path} does not exist")
    payload = read_torch(path, map_location, remedy=repair_hint(path))
    if not isinstance(payload, dict) or "model" not in payload:
        raise HessgapError(f"checkpoint {path} is not a hessgap training checkpoint (no model state in it)")
    missing = [key for key in needs if key not in payload]
    if "rng" in needs and isinstance(payload.get("rng"), dict):
        missing += [f"rng[{key!r}]" for key in _RNG_ENTRIES if key not in payload["rng"]]
    if missing:
        raise HessgapError(f"{path} lacks {', '.join(missing)}: it is incomplete (written by another program or "
                           f"version of hessgap, or edited); {repair_hint(path)}")
    return payload


def repair_hint(path: str | Path) -> str:
    """What to do about a damaged or incomplete file: a run's checkpoint, or a ``model.pt`` saved from one."""
    path = Path(path)
    if path.parent.name == CHECKPOINT_DIR:
        return ("delete this file to resume from the previous epoch's checkpoint, or use a new folder "
                "(the other checkpoints and history.json are untouched)")
    return ("rerun the `hessgap train` command that wrote it (it writes model.pt again from the run's checkpoints), "
            "or give the run's folder or one of its checkpoints instead")


def load_epoch_state(out_dir: str | Path, epoch: int, map_location: str | torch.device | None = "cpu") -> dict:
    """The model ``state_dict`` saved after ``epoch`` of the run in ``out_dir`` (for warm starts)."""
    available = list_checkpoints(out_dir)
    if int(epoch) not in available:
        raise HessgapError(
            f"no checkpoint for epoch {epoch} in {Path(out_dir) / CHECKPOINT_DIR}; "
            f"available epochs: {list(available) or 'none'}"
        )
    return load_checkpoint(available[int(epoch)], map_location)["model"]

