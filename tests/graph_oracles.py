"""Shared by the graph engine's tests: the explicit Hessian of a mean loss over batches of any structure,
and the comparison of the fused path against it (or against the generic path).

Test files import these with ``from graph_oracles import ...`` (pytest puts ``tests/`` on the path).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from torch.func import functional_call

import hessgap


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def explicit_hessian_of(model: nn.Module, batches, batch_loss, weight, vectorize: bool = True) -> torch.Tensor:
    """∇²f over the trainable parameters in float64, f = Σ_b weight(b)·batch_loss(model, b) / Σ_b weight(b).

    ``batch_loss(model, batch)`` returns a batch's mean loss (the batch given in float64); independent of
    hessgap's own loop over data.
    """
    model = copy.deepcopy(model).double().eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p.detach() for _, p in named]
    sizes = [p.numel() for p in params]

    def as_double(value):
        if isinstance(value, torch.Tensor):
            return value.double() if value.is_floating_point() else value
        if isinstance(value, dict):
            return {k: as_double(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(as_double(v) for v in value)
        return value

    batches = [as_double(b) for b in batches]
    weights = [float(weight(b)) for b in batches]
    total = sum(weights)

    class Bound(nn.Module):
        def __init__(self, state):
            super().__init__()
            self.state = state

        def __call__(self, *args, **kwargs):
            return functional_call(model, self.state, args, kwargs)

    def f(flat):
        state = dict(zip(names, (piece.view_as(p) for piece, p in zip(flat.split(sizes), params))))
        bound = Bound(state)
        return sum(batch_loss(bound, b) * w for b, w in zip(batches, weights)) / total

    hess = torch.autograd.functional.hessian(f, torch.cat([p.reshape(-1) for p in params]), vectorize=vectorize)
    return (hess + hess.T) / 2


def check_fused_against(model, data, reference_hessian, *, k=3, tol=1e-10, seed=0, **kwargs):
    """hessgap.hvp on the fused path equals V·H within ``tol`` (relative); returns the result."""
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(k, reference_hessian.shape[0], dtype=reference_hessian.dtype, generator=gen)
    result = hessgap.hvp(model, data, vectors.to(next(model.parameters()).dtype), path="fused", return_info=True,
                         **kwargs)
    assert result.path == "fused"
    err = rel_err(result.value.double(), vectors @ reference_hessian)
    assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"
    return result


def check_fused_against_generic(model, data, *, k=3, tol=1e-5, seed=0, **kwargs):
    """The fused path equals the generic (autograd) path within ``tol`` (relative); returns the fused result."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(k, n, generator=gen).to(dtype)
    fused = hessgap.hvp(model, data, vectors, path="fused", return_info=True, **kwargs)
    generic = hessgap.hvp(model, data, vectors, path="generic", **kwargs)
    assert fused.path == "fused"
    err = rel_err(fused.value.double(), generic.double())
    assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"
    return fused


@contextlib.contextmanager
def without_float32_casts():
    """Within the block, float64 tensors are never cast down to float32: ``.to(float32)``, ``.float()`` and
    ``softmax(dtype=float32)`` return them as they are. Hugging Face models compute their norms, routers and
    rotary tables in float32 whatever their dtype; inside this block a float64 copy computes in float64 only,
    so the fused path can be held to 1e-10 against the generic one (both run the same patched code)."""
    to, as_float, softmax = torch.Tensor.to, torch.Tensor.float, torch.nn.functional.softmax

    def keep_float64_to(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        return self if self.dtype == torch.float64 and out.dtype == torch.float32 else out

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else as_float(self, *args, **kwargs)

    def keep_float64_softmax(x, *args, dtype=None, **kwargs):
        return softmax(x, *args, dtype=None if x.dtype == torch.float64 else dtype, **kwargs)

    torch.Tensor.to, torch.Tensor.float, torch.nn.functional.softmax = keep_float64_to, keep_float64, keep_float64_softmax
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.float, torch.nn.functional.softmax = to, as_float, softmax
