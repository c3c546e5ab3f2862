"""What every rule of the fused engine shares: the error that sends a model to the generic path, the
interface of a layer's R-operator rule, and small helpers on shapes and parameter slots.

Shapes: a primal tensor has shape (B, ...); its R-counterpart has shape (k, B, ...).
"""

from __future__ import annotations

import torch


class FusedUnsupported(Exception):
    """The model, loss or data is outside what the fused engine handles; the message says what."""


class LayerRule:
    """The R-operator rule of one layer. Each rule implements

    - ``forward(x) -> (y, ctx)``: primal, saving what the other passes need;
    - ``backward(ctx, g_y) -> g_x``: first-order gradient w.r.t. the input;
    - ``rforward(ctx, rx, v) -> ry``: ``rx`` is None when the input does not depend on θ;
    - ``rbackward(ctx, g_y, rg_y, rx, v, need_rg_x) -> (rg_x, [R{∂L/∂p} per own trainable parameter])``;

    where ``v`` holds the layer's own parameter directions (None for a frozen parameter).
    """

    slots: tuple[int | None, ...] = ()  # positions of the layer's (weight, bias) among the trainable parameters


def param_slot(p: torch.Tensor | None, index_of: dict[int, int]) -> int | None:
    """Index of ``p`` among the differentiated parameters, or None when absent, frozen, or left out by
    ``params=`` (held fixed like a frozen one)."""
    if p is None or not p.requires_grad:
        return None
    return index_of.get(id(p))


def pair(value) -> tuple[int, int]:
    """A module's size argument (an int or a pair) as a pair."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def shape_of(shape, like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``shape`` whose values are never read (convolution_backward needs the weight's shape)."""
    return torch.empty((1,) * len(shape), device=like.device, dtype=like.dtype).expand(shape)


def k_of(v, rx) -> int:
    """k, the number of directions, from the R-input or from the layer's own parameter directions."""
    if rx is not None:
        return rx.shape[0]
    for t in v:
        if t is not None:
            return t.shape[0]
    raise AssertionError("a layer with neither R-input nor parameter directions has no R-output")
