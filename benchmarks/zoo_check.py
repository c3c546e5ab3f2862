"""Exactness of hessgap's HVP on a zoo configuration: the path it takes and its error against a float64
double backward written here, independently of hessgap's own loop over the data.

The check runs on a float64 copy of the model and its two ragged batches. Where the model computes in float64
throughout, hessgap's product must match the reference to ``FLOAT64_TOL`` relative. Some models cast to
float32 inside whatever the parameters' dtype (Hugging Face's RMSNorm, ConvNeXt's LayerNorm, rotary tables):
their function is rounded to float32 in places, so the float64 reference only bounds the error at float32's
level (``CAST_REFERENCE_TOL``); they are also checked against hessgap's generic path on the same copy, which
goes through the same casts (``CAST_GENERIC_TOL``). :func:`low_precision_ops` finds those casts by watching
every op of one float64 forward.

PyTorch has no double backward of hardswish and hardsigmoid (MobileNetV3), so the reference computes them in
plain ops (:func:`hard_activations_in_plain_ops`): the same function, whose second derivative is the same
wherever it exists (everywhere but the kinks at ±3).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hessgap

from zoo_models import ZooCase, units

FLOAT64_TOL = 1e-10
CAST_REFERENCE_TOL = 1e-4
CAST_GENERIC_TOL = 1e-5
LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


class _LowPrecisionOps(TorchDispatchMode):
    """Records the ops that take a float64 tensor and return a floating tensor of less precision: the casts
    down (tensors made in float32 from nothing, such as masks, do not count)."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        takes_float64 = any(isinstance(t, torch.Tensor) and t.dtype == torch.float64
                            for t in tree_leaves((args, kwargs)))
        if takes_float64 and any(isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION for t in tree_leaves(out)):
            self.ops.add(func.overloadpacket.__name__)
        return out


def low_precision_ops(model: torch.nn.Module, batch: tuple) -> list[str]:
    """The ops of a forward of a float64 ``model`` on ``batch`` that cast float64 tensors to float32 (or half)."""
    spotter = _LowPrecisionOps()
    with torch.no_grad(), spotter:
        model(*batch[:-1])
    return sorted(spotter.ops)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@contextmanager
def hard_activations_in_plain_ops():
    """Within the block, ``F.hardswish`` and ``F.hardsigmoid`` (which ``nn.Hardswish``/``nn.Hardsigmoid`` call)
    are x·clamp(x + 3, 0, 6)/6 and clamp(x + 3, 0, 6)/6, which autograd differentiates twice."""
    saved = F.hardswish, F.hardsigmoid
    F.hardsigmoid = lambda x, inplace=False: torch.clamp(x + 3, 0, 6) / 6
    F.hardswish = lambda x, inplace=False: x * torch.clamp(x + 3, 0, 6) / 6
    try:
        yield
    finally:
        F.hardswish, F.hardsigmoid = saved


def reference_hvp(model: torch.nn.Module, loader: list[tuple], loss_fn, V: torch.Tensor) -> torch.Tensor:
    """H·vᵢ for the rows of V, H the Hessian of Σ_b u_b·loss_b / Σ_b u_b (u_b: the batch's counted targets), by
    a double backward per batch and vector (attention on PyTorch's math kernels, which have that rule; hardswish
    and hardsigmoid in plain ops, which have it too)."""
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    total = sum(units(batch) for batch in loader)
    out = torch.zeros_like(V)
    with sdpa_kernel([SDPBackend.MATH]), hard_activations_in_plain_ops():
        for batch in loader:
            loss = loss_fn(model(*batch[:-1]), batch[-1]) * (units(batch) / total)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            for row, v in enumerate(V):
                pieces = [piece.view_as(p) for piece, p in zip(v.split(sizes), params)]
                products = torch.autograd.grad([grads[i] for i in live], params, [pieces[i] for i in live],
                                               retain_graph=True, allow_unused=True)
                out[row] += torch.cat([(torch.zeros_like(p) if h is None else h).reshape(-1)
                                       for h, p in zip(products, params)])
    return out


def check(case: ZooCase, k: int = 2, seed: int = 0) -> dict:
    """The path hessgap takes on the float64 copy of ``case``, and its relative errors (see the module's doc).

    Returns ``path``, ``fallback_reason``, ``notes``, ``computes_in`` ("float64" or "float32 inside"),
    ``low_precision_ops``, ``error_reference``, ``error_generic`` (None where the model computes in float64),
    ``tolerance`` and ``exact``.
    """
    double = case.double()
    ops = low_precision_ops(double.eager, double.loader[0])
    V = torch.randn(k, double.n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    operator = hessgap.HessianOperator(double.model, double.loader, loss_fn=case.loss_fn)
    products = operator.matmat(V)
    reference = reference_hvp(double.eager, double.loader, case.loss_fn, V)
    out = {"path": operator.path, "fallback_reason": operator.fallback_reason, "notes": list(operator.notes),
           "computes_in": "float32 inside" if ops else "float64", "low_precision_ops": ops,
           "error_reference": rel_err(products, reference), "error_generic": None}
    if ops:
        generic = hessgap.HessianOperator(double.model, double.loader, loss_fn=case.loss_fn, path="generic")
        out["error_generic"] = rel_err(products, generic.matmat(V))
        out["tolerance"] = {"reference": CAST_REFERENCE_TOL, "generic": CAST_GENERIC_TOL}
        out["exact"] = out["error_reference"] <= CAST_REFERENCE_TOL and out["error_generic"] <= CAST_GENERIC_TOL
    else:
        out["tolerance"] = {"reference": FLOAT64_TOL}
        out["exact"] = out["error_reference"] <= FLOAT64_TOL
    return out
