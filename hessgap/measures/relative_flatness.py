"""Relative flatness (Petzka et al. 2021, "Relative flatness and generalization", Definition 3, the trace
form κ^φ_Tr):

    κ_Tr(W) = Σ_{s,s'=1}^{d} ⟨w_s, w_s'⟩ · Tr(H_{s,s'}(W))

W ∈ R^{d×m} the weights of the last linear layer (mapping the penultimate representation φ(x) ∈ R^m to d
outputs), w_s its rows, H_{s,s'} the m × m block of the training loss's Hessian with respect to w_s and w_s'.
Rescaling φ by λ > 0 and W by 1/λ (a ReLU or BatchNorm layer before it allows exactly that) leaves κ_Tr
unchanged: the Gram matrix scales by λ⁻², the Hessian by λ².

Estimated without forming any block: with G = WWᵀ = Σ_k λ_k q_k q_kᵀ and a Rademacher vector u ∈ R^m,
Σ_k λ_k (q_k ⊗ u)ᵀ H (q_k ⊗ u) = Σ_{s,s'} G_{ss'} uᵀ H_{ss'} u, whose expectation over u is κ_Tr. Every probe
u takes d Hessian-vector products, all probes in one batched pass over the data restricted to W
(``params=``). ``form="simple"`` gives the cruder ‖W‖²_F · Tr(H_W) (a bound-like simplification used in
follow-up work), by Hutchinson on the same operator.

The layer is the model's last ``nn.Linear``, and only when the model's outputs are that layer's outputs
(checked on a batch: a model that ends in another layer, a softmax or a reshape after it, is refused rather
than measured on an inner layer); ``layer=`` names any ``nn.Linear`` of the model instead (Petzka et al.
define the measure for any layer that feeds the rest of the network).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _checks
from .._state import preserved
from ..curvature.objective import output_tensor
from ..curvature.operator import HessianOperator
from ..errors import HessgapError
from .average_case import mean_and_stderr
from .context import Context, NotApplicable, Outcome

DEFAULT_PROBES = 16
FORMS = ("petzka", "simple")


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def feature_layer(ctx: Context, layer: str | None = None) -> tuple[str, nn.Linear]:
    """The linear layer relative flatness is taken over: ``layer`` (a module name) when given, else the last
    ``nn.Linear`` of the model, provided the model's outputs are its outputs (checked on the first batch)."""
    linear = linear_layers(ctx.model)
    names = ", ".join(repr(name) for name, _ in linear) or "none"
    if layer is not None:
        modules = dict(ctx.model.named_modules())
        if not isinstance(layer, str) or layer not in modules:
            raise HessgapError(f"relative_flatness: layer={layer!r} is not a module name of the model; its nn.Linear "
                               f"layers are {names}")
        if not isinstance(modules[layer], nn.Linear):
            raise HessgapError(f"relative_flatness: layer {layer!r} is a {type(modules[layer]).__name__}, not an "
                               f"nn.Linear; the model's nn.Linear layers are {names}")
        name, found = layer, modules[layer]
    elif not linear:
        raise NotApplicable("it is taken over the weights of the last linear layer, and the model has no nn.Linear")
    else:
        name, found = linear[-1]
        ctx.agreed(lambda: _check_feeds_outputs(ctx, name, found, names))
    if not found.weight.requires_grad:
        raise NotApplicable(f"the linear layer {name} is frozen (requires_grad=False)")
    return name, found


def _check_feeds_outputs(ctx: Context, name: str, layer: nn.Linear, names: str) -> None:
    """Raise :class:`NotApplicable` unless the model's outputs on the first batch are ``layer``'s outputs."""
    seen = []
    hook = layer.register_forward_hook(lambda module, args, output: seen.append(output))
    batch = next(iter(ctx.objective().batches()))
    try:
        with torch.no_grad(), preserved(ctx.model, train_mode=False, parameters=False):
            outputs = output_tensor(ctx.model(*batch.args, **batch.kwargs))
    finally:
        hook.remove()
    if seen and (seen[-1] is outputs or (seen[-1].shape == outputs.shape and torch.equal(seen[-1], outputs))):
        return
    leaves = [(n, m) for n, m in ctx.model.named_modules() if not list(m.children())]
    last = f"; its last module is {leaves[-1][0]!r} ({type(leaves[-1][1]).__name__})" if leaves else ""
    raise NotApplicable(
        f"the model's outputs are not those of its last nn.Linear ({name!r}){last}, and relative flatness is "
        "taken over the layer that maps the features to the outputs; name the layer to measure with "
        f"options={{'relative_flatness': {{'layer': ...}}}} (its nn.Linear layers: {names})"
    )


def _rademacher(count: int, size: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    signs = torch.randint(0, 2, (count, size), generator=generator, device=like.device)
    return signs.to(like.dtype).mul_(2).sub_(1)


def relative_flatness(ctx: Context, probes: int = DEFAULT_PROBES, form: str = "petzka",
                      layer: str | None = None) -> Outcome:
    """κ_Tr of the last linear layer, or of the nn.Linear named ``layer`` (``form="petzka"``), or
    ‖W‖²_F·Tr(H_W) (``"simple"``), with the standard error over the Hutchinson probes."""
    _checks.positive_int(probes, "probes", "Hutchinson probes")
    if form not in FORMS:
        raise NotApplicable(f"unknown form {form!r}; choose one of {', '.join(FORMS)}")
    name, module = feature_layer(ctx, layer)
    weight = module.weight
    # the generic path: the fused engine's plan does not take a params= subset of a model's trainable weights
    operator = HessianOperator(ctx.model, ctx.batches, loss_fn=ctx.loss_fn, params=[weight], cache_batches=True,
                               path="generic")
    W = weight.detach().to(operator.dtype)
    d, m = W.shape
    generator = ctx.generator(salt=7)
    if form == "simple":
        Z = _rademacher(probes, d * m, generator, W)
        HZ = operator.matmat(Z)
        norm = float(W.double().pow(2).sum())
        estimates = [norm * float(torch.dot(z.double(), hz.double())) for z, hz in zip(Z, HZ)]
    else:
        lam, Q = torch.linalg.eigh(W.double() @ W.double().T)  # G = Q diag(λ) Qᵀ, columns q_k
        lam = lam.clamp_min(0)
        U = _rademacher(probes, m, generator, W)
        V = torch.einsum("sk,pj->pksj", Q.to(W.dtype), U).reshape(probes * d, d * m)  # rows q_k ⊗ u_p
        HV = operator.matmat(V)
        quad = (V.double() * HV.double()).sum(1).reshape(probes, d)  # (q_k ⊗ u_p)ᵀ H (q_k ⊗ u_p)
        estimates = (quad @ lam).tolist()
    value, stderr = mean_and_stderr(estimates)
    if not math.isfinite(value):
        raise NotApplicable("the estimate is not finite")
    return Outcome(value, stderr, details={"layer": name, "shape": [d, m], "probes": probes, "form": form,
                                           "hvps": operator.hvps, "path": operator.path})
