"""Directions around one model: random (normalized as Li et al. 2018), Hessian eigenvectors, or given tensors.

Each function returns, per axis, one tensor per trainable parameter (in ``model.parameters()`` order), on the
parameters' device and dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import HessgapError
from ..names import LANDSCAPE_DIRECTIONS, LANDSCAPE_NORMALIZATIONS
from ..spectrum.lanczos import eigenvalues

NORMALIZATIONS = LANDSCAPE_NORMALIZATIONS
IGNORE = ("biasbn", None)
HESSIAN_KINDS = LANDSCAPE_DIRECTIONS[1:]


def random_directions(params: Sequence[torch.Tensor], dims: int, normalization: str, ignore: str | None,
                      seed: int) -> list[list[torch.Tensor]]:
    """Gaussian directions, drawn on the CPU from ``seed`` (the same on every device), then normalized.

    As Li et al.'s code (``net_plotter.normalize_directions_for_weights``): "filter" rescales each filter
    (each slice along the first dimension) of a tensor with two or more dimensions to the norm of the same
    filter of the weights, "layer" each whole tensor to the norm of the weight tensor, "none" keeps the
    Gaussian draw. One-dimensional tensors (biases, BatchNorm) get a zero direction with
    ``ignore="biasbn"``; with ``ignore=None`` they get the weights themselves under "filter" and "layer"
    (Li et al.'s choice) and the Gaussian draw under "none".
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    axes = []
    for _ in range(dims):
        axis = []
        for weights in params:
            w = weights.detach()
            d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
            if w.dim() <= 1:
                if ignore == "biasbn":
                    d.zero_()
                elif normalization != "none":
                    d.copy_(w)
            elif normalization == "filter":
                d_rows, w_rows = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
                d_rows.mul_((w_rows.norm(dim=1) / (d_rows.norm(dim=1) + 1e-10)).unsqueeze(1))
            elif normalization == "layer":
                d.mul_(w.norm() / d.norm())
            axis.append(d)
        axes.append(axis)
    return axes


def hessian_directions(model, data, kind: str, dims: int, *, loss_fn, max_batches, seed: int,
                       curvature: str = "hessian") -> tuple[list[torch.Tensor], list[float]]:
    """Unit eigenvectors of the Hessian of the mean loss (eval mode) as flat (n,) rows, and their eigenvalues.

    "hessian": the eigenvectors of the largest eigenvalues (one per axis). "hessian-min": on a line the
    eigenvector of the smallest (most negative) eigenvalue; on a plane the largest and the smallest, the
    directions of steepest curvature up and down. Signs are fixed so that each vector's largest-magnitude
    entry is positive, which makes the surface the same on every run. ``curvature`` takes the eigenvectors of
    another matrix (the GGN, a Fisher: :data:`hessgap.names.CURVATURES`).
    """
    def solve(k: int, which: str):
        found = eigenvalues(model, data, k=k, which=which, tol=1e-4, criterion="residual", seed=seed,
                                    loss_fn=loss_fn, max_batches=max_batches, curvature=curvature)
        return list(found.eigenvectors), [float(v) for v in found.eigenvalues]

    if kind == "hessian":
        vectors, values = solve(dims, "LA")
    elif dims == 1:
        vectors, values = solve(1, "SA")
    else:
        top, top_values = solve(1, "LA")
        bottom, bottom_values = solve(1, "SA")
        vectors, values = top + bottom, top_values + bottom_values
    return [_fixed_sign(v) for v in vectors], values


def _fixed_sign(vector: torch.Tensor) -> torch.Tensor:
    return vector if vector[vector.abs().argmax()] >= 0 else -vector


def split_flat(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One flat (n,) vector as tensors shaped like ``params``."""
    pieces = torch.split(flat, [p.numel() for p in params])
    return [piece.reshape(p.shape).to(p) for piece, p in zip(pieces, params)]


def given_directions(value, names: Sequence[str], params: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Directions the caller passed: a (dims, n) or (n,) tensor, or per axis a flat (n,) tensor or a list of
    tensors shaped like the trainable parameters."""
    n = sum(p.numel() for p in params)
    hint = (f"give a ({n},) or (2, {n}) tensor (n = the trainable parameters, in model.parameters() order), or per "
            f"direction a list of {len(params)} tensors shaped like the parameters")
    if isinstance(value, torch.Tensor):
        rows = [value] if value.dim() == 1 else list(value) if value.dim() == 2 else None
        if rows is None:
            raise HessgapError(f"directions tensor has shape {tuple(value.shape)}; {hint}")
    elif isinstance(value, (list, tuple)):
        rows = list(value)
    else:
        raise HessgapError(f"directions must be 'random', 'hessian', 'hessian-min', tensors or a model; got "
                           f"{type(value).__name__}; {hint}")
    if not 1 <= len(rows) <= 2:
        raise HessgapError(f"directions holds {len(rows)} directions; a landscape has 1 or 2; {hint}")
    axes = []
    for axis, row in enumerate(rows):
        if isinstance(row, torch.Tensor):
            if row.dim() != 1 or row.numel() != n:
                raise HessgapError(f"direction {axis} has shape {tuple(row.shape)}, expected ({n},); {hint}")
            axes.append(split_flat(row, params))
            continue
        if not isinstance(row, (list, tuple)) or len(row) != len(params):
            count = len(row) if isinstance(row, (list, tuple)) else type(row).__name__
            raise HessgapError(f"direction {axis} holds {count} tensors, expected {len(params)}; {hint}")
        for name, d, p in zip(names, row, params):
            if not isinstance(d, torch.Tensor) or d.shape != p.shape:
                shape = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
                raise HessgapError(f"direction {axis} for parameter {name} has shape {shape}, expected "
                                   f"{tuple(p.shape)}; {hint}")
        axes.append([d.detach().to(p) for d, p in zip(row, params)])
    for axis in axes:
        if not all(bool(torch.isfinite(d).all()) for d in axis):
            raise HessgapError("a given direction holds NaN or inf; pass finite directions")
    return axes
