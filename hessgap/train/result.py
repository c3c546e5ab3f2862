"""The outcome of a training run (:class:`TrainResult`): the trained model, its starting point and history,
written to and read back from one file, a run's checkpoint or a run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._io import jsonable, read_json
from ..errors import HessgapError, one_line
from .checkpoint import (
    HISTORY_FILE,
    RESULT_ENTRIES,
    list_checkpoints,
    load_checkpoint,
    repair_hint,
    save_checkpoint,
)
from .config import TrainConfig
from .models import build_model, count_parameters


@dataclass
class TrainResult:
    """A trained model (eval mode) with its starting point and per-epoch history.

    ``history`` holds one dict per epoch (epoch, train_loss, train_acc, test_loss, test_acc,
    distance_from_start, sharpness, batch_size, lr, seconds, batch_loss: the mean loss of the epoch's
    training steps, and sharpness_seconds where sharpness was measured); accuracies are fractions in [0, 1],
    ``seconds`` is the time of the epoch's training and evaluation.
    ``diverged`` is the epoch whose loss became non-finite (training stopped there; ``model`` then holds
    the last finite weights, the checkpoint of the epoch before), or None. ``stopped_early`` is the epoch
    at which patience ended the run, or None. ``tracking`` holds the records of ``TrainConfig.track`` (one per
    ``track_every`` optimizer steps, see :class:`hessgap.Tracker`), empty when nothing was tracked.
    """

    model: nn.Module
    x0: torch.Tensor
    history: list[dict]
    diverged: int | None
    config: TrainConfig
    input_shape: tuple = ()
    num_classes: int = 0
    dataset: str = ""
    stopped_early: int | None = None
    out_dir: str | None = None
    resumed_from: int | None = None
    tracking: list[dict] = field(default_factory=list)

    @property
    def final(self) -> dict:
        return dict(self.history[-1]) if self.history else {}

    @property
    def finished(self) -> bool:
        """True when the run has nothing left to do: all epochs done, stopped by patience, or diverged."""
        return (self.diverged is not None or self.stopped_early is not None
                or len(self.history) >= self.config.epochs)

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    def to_dict(self) -> dict:
        """JSON-ready summary (everything except the tensors)."""
        return jsonable({
            "config": self.config.to_dict(),
            "dataset": self.dataset,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "num_parameters": self.num_parameters,
            "history": self.history,
            "final": self.final,
            "diverged": self.diverged,
            "stopped_early": self.stopped_early,
            "finished": self.finished,
            "out_dir": self.out_dir,
            "tracking": self.tracking,
        })

    def save(self, path: str | Path) -> None:
        """Write the trained weights, x0, history and config to one file (atomic)."""
        payload = {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "x0": self.x0.detach().cpu(),
            **{k: v for k, v in self.to_dict().items() if k not in ("final", "num_parameters", "finished")},
            "history": self.history,
        }
        save_checkpoint(path, payload)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> TrainResult:
        """Read a file written by :meth:`save`, a run's per-epoch checkpoint, or a run folder (its latest
        checkpoint, with the divergence recorded in its history.json) and rebuild the model."""
        folder = Path(path)
        recorded: dict = {}
        if folder.is_dir():
            available = list_checkpoints(folder)
            if not available:
                raise HessgapError(f"{folder} holds no training checkpoints (expected {folder}/checkpoints/epoch_*.pt)")
            path = available[max(available)]
            if (folder / HISTORY_FILE).is_file():
                recorded = read_json(folder / HISTORY_FILE)
        payload = load_checkpoint(path, map_location, needs=RESULT_ENTRIES)
        if recorded.get("diverged") is not None:
            payload["diverged"] = recorded["diverged"]
            payload["history"] = list(payload.get("history", [])) + [
                h for h in recorded.get("history", []) if h["epoch"] > payload["epoch"]][:1]
            payload["out_dir"] = str(folder)
        try:
            config = TrainConfig.from_dict(payload["config"])
            model = build_model(config.model, payload["input_shape"], payload["num_classes"],
                                config.width, config.depth, config.dropout, conv_dropout=config.conv_dropout)
            model.load_state_dict(payload["model"])
        except HessgapError:
            raise
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise HessgapError(f"{path} does not hold a complete hessgap training result ({one_line(exc)}); "
                               f"{repair_hint(path)}") from exc
        model.to(map_location).eval()
        return cls(model=model, x0=payload["x0"], history=list(payload.get("history", [])),
                   diverged=payload.get("diverged"), config=config, input_shape=tuple(payload["input_shape"]),
                   num_classes=payload["num_classes"], dataset=payload.get("dataset", config.dataset),
                   stopped_early=payload.get("stopped_early"), out_dir=payload.get("out_dir"),
                   tracking=list(payload.get("tracking", [])))
