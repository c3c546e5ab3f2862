"""The element-wise second-order pieces of the fused HVP engine, ``torch.ops.hessgap.hvp_*``, and their twins.

For k directions at once (tensors named ``t``, ``rz``, ``rg`` have shape ``(k, *z.shape)``):

    act_jvp(z, t)                 σ'(z) ⊙ t[j]                            R{a} of a = σ(z)
    act_rbackward(z, g, rz, rg)   σ'(z) ⊙ rg[j] + σ''(z) ⊙ g ⊙ rz[j]       R{∂L/∂z}, g = ∂L/∂a
    softmax_ce_rgrad(p, rz, s)    s · p ⊙ (rz[j] − ⟨p, rz[j]⟩ per row)      R{∂L/∂logits} of softmax CE

Activation kinds: ``relu``, ``leaky_relu`` (with ``slope``), ``tanh``, ``sigmoid``, ``gelu`` (erf form),
``gelu_tanh`` (GELU's tanh approximation) and ``silu`` (x·sigmoid(x)). ReLU and LeakyReLU take PyTorch's left derivative at 0.
The ``*_reference`` functions compute the same with plain PyTorch ops (σ', σ'' by autograd), for tests.
"""

from __future__ import annotations

import torch

from .. import _extension
from ._precision import in_float32

ACTIVATION_KINDS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu", "gelu_tanh", "silu")


def _check_kind(kind: str) -> None:
    if kind not in ACTIVATION_KINDS:
        raise ValueError(f"kind must be one of {ACTIVATION_KINDS}, got {kind!r}")


def _ops():
    _extension.require()
    return torch.ops.hessgap


def act_jvp(z: torch.Tensor, t: torch.Tensor, kind: str, slope: float = 0.01) -> torch.Tensor:
    """σ'(z) ⊙ t[j] for each of the k slices of ``t`` (shape ``(k, *z.shape)``), by the compiled kernel."""
    _check_kind(kind)
    return in_float32(_ops().hvp_act_jvp.default, z, t, kind, float(slope))


def act_rbackward(
    z: torch.Tensor, g: torch.Tensor, rz: torch.Tensor, rg: torch.Tensor, kind: str, slope: float = 0.01
) -> torch.Tensor:
    """σ'(z) ⊙ rg[j] + σ''(z) ⊙ g ⊙ rz[j] for k directions, by the compiled kernel."""
    _check_kind(kind)
    return in_float32(_ops().hvp_act_rbackward.default, z, g, rz, rg, kind, float(slope))


def softmax_ce_rgrad(p: torch.Tensor, rz: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · p ⊙ (rz[j] − ⟨p, rz[j]⟩_row)``: the softmax cross-entropy Hessian w.r.t. the logits applied
    to k directions; ``p`` is the (batch, classes) softmax, ``scale`` is 1/(samples the loss averages over)."""
    return in_float32(_ops().hvp_softmax_ce_rgrad.default, p, rz, float(scale))


def act_derivatives(z: torch.Tensor, kind: str, slope: float = 0.01) -> tuple[torch.Tensor, torch.Tensor | None]:
    """σ'(z) and σ''(z) (None for the piecewise-linear kinds, whose σ'' is 0) with PyTorch's vectorized
    element-wise ops: computed once per batch, they turn each direction's R-passes into products (one pass
    per direction, where the kernels evaluate the transcendental functions element by element)."""
    _check_kind(kind)
    if kind == "relu":
        return (z > 0).to(z.dtype), None
    if kind == "leaky_relu":
        return torch.full_like(z, float(slope)).masked_fill_(z > 0, 1), None
    if kind in ("tanh", "sigmoid", "silu"):
        if kind == "tanh":
            y = torch.tanh(z)
            d1 = 1 - y * y
            return d1, d1.mul(y).mul_(-2)
        s = torch.sigmoid(z)
        ds = s * (1 - s)
        if kind == "sigmoid":
            return ds, ds * (1 - 2 * s)
        # σ = z s: σ' = s + z s (1 − s), σ'' = s (1 − s) (2 + z (1 − 2 s))
        return s.addcmul(z, ds), ds.mul((1 - 2 * s).mul_(z).add_(2))
    if kind == "gelu":
        # σ = z Φ(z): σ' = Φ + z φ, σ'' = φ (2 − z²)
        pdf = torch.exp(z * z * -0.5).mul_(0.3989422804014327)
        cdf = torch.erf(z * 0.7071067811865476).add_(1).mul_(0.5)
        return cdf.addcmul_(z, pdf), pdf.mul_(2 - z * z)
    # gelu_tanh: σ = ½ z (1 + tanh u), u = c (z + a z³)
    c, a = 0.7978845608028654, 0.044715
    z2 = z * z
    t = torch.tanh(z * (1 + a * z2) * c)
    sech2 = 1 - t * t
    du = (1 + 3 * a * z2) * c
    dt = sech2 * du
    d1 = (1 + t).mul_(0.5).addcmul_(z, dt, value=0.5)
    ddt = (-2 * t * du).mul_(dt).addcmul_(sech2, z * (6 * a * c))
    return d1, ddt.mul_(0.5 * z).add_(dt)


# ---- plain-PyTorch twins -------------------------------------------------------------------------------


def activation_reference(z: torch.Tensor, kind: str, slope: float = 0.01) -> torch.Tensor:
    """σ(z) with torch.nn.functional, the function whose derivatives the kernels compute."""
    _check_kind(kind)
    f = torch.nn.functional
    if kind == "relu":
        return f.relu(z)
    if kind == "leaky_relu":
        return f.leaky_relu(z, slope)
    if kind == "tanh":
        return torch.tanh(z)
    if kind == "sigmoid":
        return torch.sigmoid(z)
    if kind == "gelu":
        return f.gelu(z)
    if kind == "silu":
        return f.silu(z)
    return f.gelu(z, approximate="tanh")


def activation_derivatives_reference(z: torch.Tensor, kind: str, slope: float = 0.01):
    """σ'(z) and σ''(z) by double autograd through :func:`activation_reference`."""
    with torch.enable_grad():
        x = z.detach().clone().requires_grad_(True)
        (d1,) = torch.autograd.grad(activation_reference(x, kind, slope).sum(), x, create_graph=True)
        if d1.requires_grad:
            (d2,) = torch.autograd.grad(d1.sum(), x, allow_unused=True)
        else:
            d2 = None
    d2 = torch.zeros_like(z) if d2 is None else d2
    return d1.detach(), d2.detach()


def act_jvp_reference(z: torch.Tensor, t: torch.Tensor, kind: str, slope: float = 0.01) -> torch.Tensor:
    d1, _ = activation_derivatives_reference(z, kind, slope)
    return d1.unsqueeze(0) * t


def act_rbackward_reference(
    z: torch.Tensor, g: torch.Tensor, rz: torch.Tensor, rg: torch.Tensor, kind: str, slope: float = 0.01
) -> torch.Tensor:
    d1, d2 = activation_derivatives_reference(z, kind, slope)
    return d1.unsqueeze(0) * rg + (d2 * g).unsqueeze(0) * rz


def softmax_ce_rgrad_reference(p: torch.Tensor, rz: torch.Tensor, scale: float) -> torch.Tensor:
    dot = (p.unsqueeze(0) * rz).sum(-1, keepdim=True)
    return scale * p.unsqueeze(0) * (rz - dot)


# ---- fake kernels (shape only) for torch.compile and meta tensors; only when the build is there ----------

if _extension.available():

    @torch.library.register_fake("hessgap::hvp_act_jvp")
    def _act_jvp_fake(z, t, kind, slope=0.01):
        torch._check(t.dim() == z.dim() + 1, lambda: "t must have shape (k, *z.shape)")
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    @torch.library.register_fake("hessgap::hvp_act_rbackward")
    def _act_rbackward_fake(z, g, rz, rg, kind, slope=0.01):
        torch._check(rg.dim() == z.dim() + 1, lambda: "rg must have shape (k, *z.shape)")
        return torch.empty_like(rg, memory_format=torch.contiguous_format)

    @torch.library.register_fake("hessgap::hvp_softmax_ce_rgrad")
    def _softmax_ce_rgrad_fake(p, rz, scale):
        torch._check(p.dim() == 2 and rz.dim() == 3, lambda: "p must be (batch, classes), rz (k, batch, classes)")
        return torch.empty_like(rz, memory_format=torch.contiguous_format)
