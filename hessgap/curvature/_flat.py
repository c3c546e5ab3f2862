"""Directions in parameter space: the (k, n) flat form and the per-parameter list form, checked and converted.

n is the number of trainable parameters flattened in ``model.parameters()`` order; the list form holds
one tensor of shape ``(k, *p.shape)`` per trainable parameter ``p``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import HessgapError, NonFiniteError


@dataclass(frozen=True)
class Directions:
    """k directions as per-parameter tensors ``(k, *p.shape)``, and the form they came in."""

    parts: list[torch.Tensor]
    flat: bool  # True: the caller passed a (k, n) tensor and gets one back

    @property
    def k(self) -> int:
        return self.parts[0].shape[0]

    def chunks(self, size: int) -> list[list[torch.Tensor]]:
        return [[p[start : start + size] for p in self.parts] for start in range(0, self.k, size)]

    def like_input(self, parts: Sequence[torch.Tensor], flat: torch.Tensor | None = None):
        """``parts`` (per-parameter results) in the form the directions were given; ``flat`` is their
        (k, n) storage when they are views into one (saves the concatenation)."""
        if self.flat:
            return flat if flat is not None else flatten(parts)
        return list(parts)


def flatten(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-parameter ``(k, *shape)`` tensors -> one ``(k, n)`` tensor."""
    k = parts[0].shape[0]
    return torch.cat([p.reshape(k, -1) for p in parts], dim=1)


def unflatten(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A ``(k, n)`` tensor -> per-parameter ``(k, *p.shape)`` views."""
    k = flat.shape[0]
    sizes = [p.numel() for p in params]
    return [piece.reshape((k,) + tuple(p.shape)) for piece, p in zip(flat.split(sizes, dim=1), params)]


def as_directions(vectors, params: Sequence[torch.Tensor], names: Sequence[str]) -> Directions:
    """Check ``vectors`` against the trainable parameters and bring them to the per-parameter form.

    Accepts a ``(k, n)`` tensor, an ``(n,)`` tensor is refused with a hint (k must be explicit), or a
    list/tuple with one ``(k, *p.shape)`` tensor per trainable parameter. Values must be finite and on
    the parameters' device; they are cast to the parameters' dtype.
    """
    n = sum(p.numel() for p in params)
    device, dtype = params[0].device, params[0].dtype
    if isinstance(vectors, torch.Tensor):
        if vectors.dim() != 2:
            hint = " (for one vector use v.unsqueeze(0) or HessianOperator.matvec)" if vectors.dim() == 1 else ""
            raise HessgapError(
                f"vectors has shape {tuple(vectors.shape)}; pass a (k, n) tensor with n = {n} trainable "
                f"parameters, or a list of per-parameter tensors with a leading dimension k{hint}"
            )
        if vectors.shape[1] != n:
            raise HessgapError(
                f"vectors has {vectors.shape[1]} columns but the model has n = {n} trainable parameters; "
                "flatten directions in model.parameters() order (requires_grad parameters only)"
            )
        _check_k(vectors.shape[0])
        _check_tensor(vectors, "vectors", device)
        parts = unflatten(vectors.to(dtype), params)
        flat = True
    elif isinstance(vectors, (list, tuple)):
        if len(vectors) != len(params):
            raise HessgapError(
                f"vectors is a list of {len(vectors)} tensors but the model has {len(params)} trainable "
                f"parameter tensors ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); "
                "pass one (k, *p.shape) tensor per trainable parameter"
            )
        parts = []
        k = None
        for name, v, p in zip(names, vectors, params):
            if not isinstance(v, torch.Tensor):
                raise HessgapError(f"vectors for {name} is a {type(v).__name__}, not a tensor")
            if tuple(v.shape[1:]) != tuple(p.shape) or v.dim() != p.dim() + 1:
                raise HessgapError(
                    f"vectors for {name} has shape {tuple(v.shape)}; expected (k, *{tuple(p.shape)}), "
                    "one slice per direction"
                )
            if k is None:
                k = v.shape[0]
                _check_k(k)
            elif v.shape[0] != k:
                raise HessgapError(
                    f"vectors for {name} holds {v.shape[0]} directions but the first tensor holds {k}; "
                    "every per-parameter tensor needs the same leading dimension k"
                )
            _check_tensor(v, f"vectors for {name}", device)
            parts.append(v.to(dtype))
        flat = False
    else:
        raise HessgapError(
            f"vectors must be a (k, n) tensor or a list of per-parameter tensors, got {type(vectors).__name__}"
        )
    return Directions(parts, flat)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``. One summing pass decides the common case (a NaN/inf element makes the sum
    non-finite); only a non-finite sum, which finite values can also give by overflow, takes the full check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite_products(products: torch.Tensor) -> None:
    """Raise NonFiniteError when an HVP's summed products hold NaN or inf (the loss itself was finite)."""
    if not all_finite(products):
        raise NonFiniteError("the Hessian-vector product is not finite; check the parameters and inputs for huge or "
                             "NaN values (the loss itself was finite)")


def _check_k(k: int) -> None:
    if k == 0:
        raise HessgapError("vectors holds k = 0 directions; pass at least one direction")


def _check_tensor(v: torch.Tensor, what: str, device: torch.device) -> None:
    if not v.dtype.is_floating_point:
        raise HessgapError(f"{what} has dtype {v.dtype}; directions must be floating point")
    if v.device != device:
        raise HessgapError(
            f"{what} is on {v.device} but the model's parameters are on {device}; move the vectors with "
            f".to({str(device)!r}) (or the model to the vectors' device)"
        )
    if not all_finite(v):
        raise NonFiniteError(f"{what} contains NaN or inf; Hessian-vector products need finite directions")
