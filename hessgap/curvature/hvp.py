"""Batched Hessian-vector products H·v for k directions in one pass over the data.

H is the exact Hessian, w.r.t. the trainable (or ``params=``-selected) parameters, of the mean loss over
every unit of a loader (or of one batch), as :class:`~hessgap.curvature.objective.LossOverData` defines
it: batches of any structure, weighted by the samples or tokens they average over. One pass over the data
serves all k directions.

Two paths compute the same numbers:

- ``"fused"``: the R-operator engine, over the layers of a plain layer stack (:mod:`hessgap.curvature.fused`)
  or over the torch.export graph of the batch loss for any other model (:mod:`hessgap.curvature.graph`:
  residual networks, transformers, Hugging Face models): one primal forward/backward per batch, then k
  directions stacked through BLAS calls and the fused kernels of the extension (attention included).
- ``"generic"``: any model and any scalar loss, through autograd: the batch's gradient graph is built once
  and each chunk of directions is one batched backward through it (``is_grads_batched``). Attention runs
  on PyTorch's math kernels, which have the double-backward rules its fused kernels lack.

``path="auto"`` takes the fused path when the model, loss and data allow it and otherwise the generic one;
the result records which path ran and why the fused one did not (``return_info=True``).

The Hessian is taken with the model in eval mode by default (``train_mode=False``): BatchNorm uses its
running statistics and dropout is off, so H is that of a deterministic function. ``train_mode=True`` takes it
in train mode (BatchNorm on batch statistics, one dropout mask shared by all directions), always on the
generic path. The model is left bit-exactly as it was (parameters, buffers, gradients, modes).

Half-precision models (float16, bfloat16) run their products in their own dtype and sum them over the
loader in float32; the result is float32.

This module holds the public call and its result; the pass over the data that both paths share is
:class:`~hessgap.curvature.engine.HvpEngine`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .._results import JsonResult
from ..errors import HessgapError
from ._flat import as_directions
from .engine import HvpEngine
from .finite_difference import METHODS, FiniteDifferenceEngine
from .objective import LossOverData


@dataclass(repr=False)
class HvpResult(JsonResult):
    """H·v for k directions and how it was computed.

    ``value`` has the form of the input vectors ((k, n) tensor or per-parameter list); ``path`` is
    ``"fused"`` or ``"generic"``; ``fallback_reason`` says why the fused path did not run (None when it
    ran or when the generic path was asked for); ``loss`` is the mean loss over the data, a by-product;
    ``units`` the samples or tokens f averages over; ``dtype`` the model's dtype, ``accumulation_dtype``
    the dtype of the sums over the loader; ``notes`` what the pass changed to run (attention kernels);
    ``token_chunks`` the chunks of tokens and vocabulary the fused LM head + cross-entropy chose (empty when
    the graph has none).
    """

    value: torch.Tensor | list[torch.Tensor]
    path: str
    fallback_reason: str | None
    k: int
    chunk_size: int
    batches: int
    samples: int
    loss: float
    seconds: float
    dtype: str = field(default="")
    accumulation_dtype: str = field(default="")
    units: float = 0.0
    notes: list[str] = field(default_factory=list)
    token_chunks: dict = field(default_factory=dict)

    _left_out = ("value",)  # the vectors themselves stay out of the JSON

def hvp(
    model: nn.Module,
    data,
    vectors: torch.Tensor | Sequence[torch.Tensor],
    *,
    loss_fn=None,
    compute_loss=None,
    weight_fn=None,
    max_batches: int | None = None,
    params=None,
    path: str = "auto",
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    memory_budget: int | None = None,
    train_mode: bool = False,
    group=None,
    return_info: bool = False,
    method: str = "exact",
    step: float | None = None,
):
    """H·v for k directions at once; H = Hessian of the mean loss over the data w.r.t. the parameters.

    Args:
        model: any ``nn.Module``; left bit-exactly unchanged.
        data: a DataLoader (any iterable of batches) or one batch; see :class:`hessgap.HessianOperator`.
        vectors: a ``(k, n)`` tensor (n = trainable parameters flattened in ``model.parameters()`` order)
            or a list with one ``(k, *p.shape)`` tensor per trainable parameter; the result has the same form.
        loss_fn, compute_loss, weight_fn, max_batches, params, group: as in :class:`hessgap.HessianOperator`.
        path: ``"auto"`` (fused engine when supported, else generic), ``"fused"`` (error when unsupported)
            or ``"generic"`` (autograd).
        chunk_size: directions per chunk; default: as many as fit ``max_memory``.
        max_memory: bytes (or a size such as ``"8GB"``, ``"512MiB"``) the pass may take beyond the model and
            data: it decides the directions per chunk (default 2 GiB) and the chunks of tokens and vocabulary
            of the fused LM head + cross-entropy (default: a quarter of what the device has free, at most 512 MiB).
            ``memory_budget`` is its former name.
        train_mode: take the Hessian in train mode (see the module docstring); default eval mode.
        return_info: return an :class:`HvpResult` (value, path, fallback reason, timing) instead of the value.
        method: ``"exact"`` (default) or ``"finite-difference"``: central differences of exact gradients,
            (∇f(θ + h·v) − ∇f(θ − h·v)) / 2h, two first-order passes per direction: a cross-check, and a way to
            take products where no double backward exists (FSDP2-sharded models included). Biased: about 1e-4
            relative in float32 (see :mod:`hessgap.curvature.finite_difference` for h and the measured bias);
            ``step`` overrides h.

    Raises:
        HessgapError: vectors that do not match the parameters, k = 0, an empty loader, a non-scalar loss,
            vectors on another device than the model; NonFiniteError for NaN/inf in parameters, vectors or loss.
    """
    start = time.perf_counter()
    objective = LossOverData(model, data, loss_fn, compute_loss=compute_loss, weight_fn=weight_fn,
                             max_batches=max_batches, params=params, group=group)
    objective.check_finite_parameters()
    directions = as_directions(vectors, objective.vector_params, objective.names)
    if method not in METHODS:
        raise HessgapError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    objective.agree_across_ranks("the arguments of hessgap.hvp", directions.k, path, method)
    if method == "finite-difference":
        engine = FiniteDifferenceEngine(objective, step=step, train_mode=train_mode)
    else:
        engine = HvpEngine(
            objective, path=path, train_mode=train_mode, chunk_size=chunk_size, max_memory=max_memory,
            memory_budget=memory_budget,
        )
    parts, flat, stats = engine.run(directions)
    value = directions.like_input(parts, flat)
    if not return_info:
        return value
    return HvpResult(
        value=value,
        path=engine.path,
        fallback_reason=engine.fallback_reason,
        k=directions.k,
        chunk_size=stats.chunk_size,
        batches=stats.batches,
        samples=stats.samples,
        loss=stats.loss,
        seconds=time.perf_counter() - start,
        dtype=str(objective.dtype).replace("torch.", ""),
        accumulation_dtype=str(objective.accumulation_dtype).replace("torch.", ""),
        units=stats.weight,
        notes=list(engine.notes),
        token_chunks=engine.token_chunks(),
    )
