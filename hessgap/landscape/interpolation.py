"""Between models: the paper's parametric plots (Figures 3 and 7) and planes through three models.

Line (1-D, ``path="linear"``): x(α) = (1 − α)·x_A + α·x_B. Curve (1-D, ``path="curved"``):
x(α) = cos(απ/2)·x_A + sin(απ/2)·x_B. Both pass through x_A (the model itself) at α = 0 and x_B at α = 1.
Plane (2-D, two other models, linear only): x(a, b) = (1 − a − b)·x_A + a·x_B + b·x_C.

Every floating entry of the state is combined with the same coefficients: the weights and the BatchNorm
running statistics alike, so each point is evaluated in eval mode with statistics that belong to it. A
running variance that comes out negative (extrapolation, or the curve's negative coefficients) is clamped
at 0 (BatchNorm's ε keeps the division finite) and counted per point. Integer entries (BatchNorm's
``num_batches_tracked``) are taken from x_A. These are the semantics of ``hessgap.experiments.parametric``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..errors import HessgapError
from ..names import INTERPOLATION_PATHS
from .plane import Plane

PATHS = INTERPOLATION_PATHS


def path_coefficients(alpha: np.ndarray, path: str) -> np.ndarray:
    """(P, 2) coefficients of (x_A, x_B) at the ``alpha`` values on ``path``."""
    if path == "linear":
        return np.stack([1.0 - alpha, alpha], axis=1)
    return np.stack([np.cos(alpha * math.pi / 2), np.sin(alpha * math.pi / 2)], axis=1)


def check_same_architecture(model: nn.Module, other: nn.Module, which: str) -> None:
    """``other`` must have ``model``'s state entries, shapes and dtypes, and the same trainable parameters."""
    if not isinstance(other, nn.Module):
        raise HessgapError(f"{which} must be a torch.nn.Module, got {type(other).__name__}")
    mine, theirs = model.state_dict(), other.state_dict()
    hint = "interpolate between networks built with the same architecture, width and depth"
    if mine.keys() != theirs.keys():
        only_mine = sorted(set(mine) - set(theirs))[:3]
        only_theirs = sorted(set(theirs) - set(mine))[:3]
        raise HessgapError(f"{which} has another architecture than the model (entries only in the model: "
                           f"{only_mine}, only in {which}: {only_theirs}); {hint}")
    for key, value in mine.items():
        if value.shape != theirs[key].shape or value.dtype != theirs[key].dtype:
            raise HessgapError(f"{which} differs from the model in {key}: {tuple(theirs[key].shape)} "
                               f"{theirs[key].dtype} vs {tuple(value.shape)} {value.dtype}; {hint}")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable != [n for n, p in other.named_parameters() if p.requires_grad]:
        raise HessgapError(f"{which} has other trainable parameters (requires_grad) than the model; {hint}")


def model_plane(model: nn.Module, others: list[nn.Module], path: str, names: list[str]) -> Plane:
    """The plane (or line, or curve) through ``model`` and the ``others``; ``names`` are the trainable parameters."""
    dims = len(others)
    if dims == 2 and path != "linear":
        raise HessgapError("path='curved' is a 1-D path between two models; a plane through three models is linear")
    for index, other in enumerate(others):
        check_same_architecture(model, other, "directions" if dims == 1 else f"directions[{index}]")
    states = [model.state_dict()] + [other.state_dict() for other in others]
    device = next(iter(states[0].values())).device
    moving, clamped = {}, set()
    for key, value in states[0].items():
        if value.is_floating_point():
            moving[key] = torch.stack([state[key].detach().to(device) for state in states])
            if key.endswith("running_var"):
                clamped.add(key)
    directions = torch.stack([
        torch.cat([(moving[name][axis + 1] - moving[name][0]).reshape(-1) for name in names]) for axis in range(dims)
    ])

    if dims == 1:
        def coefficient_fn(points: np.ndarray) -> np.ndarray:
            return path_coefficients(points[:, 0], path)
    else:
        def coefficient_fn(points: np.ndarray) -> np.ndarray:
            a, b = points[:, 0], points[:, 1]
            return np.stack([1.0 - a - b, a, b], axis=1)

    kind = "model" if dims == 1 else "models"
    unit_weights = (1.0,) * (dims + 1) if path == "linear" else None
    return Plane(kind, dims, moving, coefficient_fn, directions, clamped=frozenset(clamped), unit_weights=unit_weights)
