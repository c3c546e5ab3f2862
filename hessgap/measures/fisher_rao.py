"""The Fisher–Rao norm (Liang, Poggio, Rakhlin & Stokes 2019, "Fisher–Rao metric, geometry, and complexity of
neural networks", Definition 2.1 and Lemma 2.1):

    ‖θ‖²_fr = ⟨θ, I(θ) θ⟩ = E_{(x, y)} [⟨θ, ∇_θ ℓ(f_θ(x), y)⟩²]

with I(θ) the (empirical) Fisher information E[∇ℓ ∇ℓᵀ] over the data and their own labels y. For a
bias-free network of L hidden ReLU layers, ⟨θ, ∇_θ f_θ(x)⟩ = (L + 1) f_θ(x) (positive homogeneity), so
‖θ‖²_fr = (L + 1)² E[⟨∂ℓ/∂f, f_θ(x)⟩²] (Lemma 2.1); Jiang et al. 2020 (measure "fisher-rao") write it with
the (L + 1)² factor in front, a constant for one architecture that changes no ranking among networks of
one depth.

hessgap computes the definition directly, over every trainable parameter, biases and BatchNorm's affine
parameters included: ⟨θ, ∇_θ ℓ_i⟩ is the derivative of sample i's loss along the ray t ↦ (1 + t)θ, one
forward-mode product (``torch.func.jvp`` with tangent θ) per batch, then ⟨∂ℓ_i/∂f_i, ḟ_i⟩. With biases
the homogeneity identity no longer holds, but the definition does, and it stays invariant under every
rescaling of the weights that leaves the function unchanged (the gradient rescales inversely). The
model is in eval mode; the value is the mean over the samples, with the standard error of that mean. On
several ranks both are taken over every rank's samples (sums across the ranks). For a half-precision model
∂ℓ_i/∂f_i is taken in float32 (near a minimum the softmax's 1 − p is below bfloat16's resolution of p).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.func import functional_call, jvp

from .._state import preserved
from ..curvature.objective import output_tensor
from .context import Context, NotApplicable, Outcome, trainable


def directional_terms(ctx: Context) -> torch.Tensor:
    """⟨θ, ∇_θ ℓ_i⟩ for every sample i of this rank's data (float64), the model in eval mode."""
    objective = ctx.objective()
    named = trainable(ctx.model)
    params = {name: p.detach() for name, p in named}
    terms = []
    with preserved(ctx.model, train_mode=False, parameters=False):
        for batch in objective.batches():
            def outputs(p, batch=batch):
                return output_tensor(functional_call(ctx.model, p, batch.args, batch.kwargs))

            with torch.no_grad(), warnings.catch_warnings():
                # torch registers its forward-mode decompositions through torch.jit.script on the first jvp
                # and warns that torch.jit.script is deprecated: its own business, not the caller's
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
                out, tangent = jvp(outputs, (params,), (params,))
            if out.dim() == 0:
                raise NotApplicable("it needs per-sample outputs (a leading sample dimension)")
            leaf = out.detach().to(objective.accumulation_dtype).requires_grad_(True)
            with torch.enable_grad():
                loss = objective.loss_of_outputs(leaf, batch) * batch.weight  # Σ_i ℓ_i for a mean loss
                (grad,) = torch.autograd.grad(loss, leaf)
            terms.append((grad.double() * tangent.double()).reshape(out.shape[0], -1).sum(1))
    return torch.cat(terms) if terms else torch.zeros(0, dtype=torch.float64)


def fisher_rao(ctx: Context) -> Outcome:
    """‖θ‖²_fr = mean over the samples (of every rank) of ⟨θ, ∇_θ ℓ_i⟩², with its standard error."""
    squares = ctx.agreed(lambda: directional_terms(ctx)).pow(2)
    total, count = ctx.ranks.sum_numbers([float(squares.sum()), len(squares)])
    value = total / count
    # the spread about the mean of all ranks' samples, summed across the ranks in a second reduction
    (spread,) = ctx.ranks.sum_numbers([float((squares - value).pow(2).sum())])
    count = int(count)
    stderr = math.sqrt(spread / (count - 1) / count) if count > 1 else None
    return Outcome(value, stderr, details={"samples": count})
