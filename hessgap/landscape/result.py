"""The result of :func:`hessgap.landscape`: the grid, the surfaces on it, the directions and the settings."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .._results import JsonResult

#: surface name -> result field, in the order files list them
SURFACES = {"train_loss": "loss", "train_accuracy": "accuracy", "test_loss": "test_loss",
            "test_accuracy": "test_accuracy"}


@dataclasses.dataclass
class LandscapeResult(JsonResult):
    """Loss and accuracy at every point x0 + x[i]·d1 + y[j]·d2 (or on the path between models).

    ``loss`` and the other surfaces have shape (len(y), len(x)) on a plane, (len(x),) on a line; a point
    where the loss is not finite holds NaN in the loss and in the accuracy (None in JSON). ``accuracy`` is in
    percent, None when the targets are not class labels; ``test_*`` are None without test data. ``directions``
    (dims × n, the trainable parameters in ``model.parameters()`` order; x_B − x_A between models) is left out
    of ``to_dict()`` and kept in the ``.npz``. ``clamped_variances`` counts, per point of a path between
    models, the BatchNorm running variances clamped at 0. ``engine`` names the engine that ran ("stack" or
    "functional") and ``fallback_reason`` why the layer-stack engine did not. ``passes`` counts the blocks of
    rows evaluated in this call, each one pass over the data; ``rows_resumed`` the rows a run folder already
    had. ``timing`` holds the seconds spent finding the directions and evaluating the grid in this call.
    """

    x: np.ndarray
    y: np.ndarray | None
    loss: np.ndarray
    accuracy: np.ndarray | None
    test_loss: np.ndarray | None
    test_accuracy: np.ndarray | None
    directions: torch.Tensor
    kind: str
    dims: int
    settings: dict
    eigenvalues: list[float] | None
    clamped_variances: np.ndarray | None
    engine: str
    fallback_reason: str | None
    samples: int | None
    test_samples: int | None
    passes: int
    rows_resumed: int
    timing: dict
    files: dict

    _left_out = ("directions",)

    def surfaces(self) -> dict[str, np.ndarray]:
        """The surfaces this result holds, by name (train_loss, train_accuracy, test_loss, test_accuracy)."""
        found = {name: getattr(self, field) for name, field in SURFACES.items()}
        return {name: values for name, values in found.items() if values is not None}

    def save(self, folder) -> dict:
        """Write the files a run folder gets (``results/landscape.json|.npz|.vtp``, ``figures/*.png``) into
        ``folder``; returns {what: path}."""
        from pathlib import Path

        from .export import write_all

        return write_all(self, Path(folder) / "results", Path(folder) / "figures")

    def __repr__(self) -> str:
        grid = " × ".join(str(n) for n in self.loss.shape[::-1])
        finite = self.loss[np.isfinite(self.loss)]
        low = f"{finite.min():.4g}" if finite.size else "nan"
        return (f"LandscapeResult({self.kind}, {grid} points, min loss {low}, engine {self.engine}, "
                f"{self.timing.get('evaluation', 0.0):.1f} s)")
