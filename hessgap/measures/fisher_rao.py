"""The Fisher–Rao norm (Liang, Poggio, Rakhlin & Stokes 2019, "Fisher–Rao metric, geometry, and complexity of
neural networks", Definition 2.1 and Lemma 2.1):

    ‖θ‖²_fr = ⟨θ, I(θ) θ⟩ = E_u [⟨θ, ∇_θ ℓ_u⟩²]

with I(θ) the (empirical) Fisher information E[∇ℓ ∇ℓᵀ] over the data and their own labels. For a bias-free
network of L hidden ReLU layers, ⟨θ, ∇_θ f_θ(x)⟩ = (L + 1) f_θ(x) (positive homogeneity), so
‖θ‖²_fr = (L + 1)² E[⟨∂ℓ/∂f, f_θ(x)⟩²] (Lemma 2.1); Jiang et al. 2020 (measure "fisher-rao") write it with
the (L + 1)² factor in front, a constant for one architecture that changes no ranking among networks of
one depth.

The expectation runs over the *units* hessgap's loss averages over (:func:`hessgap.curvature.batches.units`),
so that the Fisher is that of the very loss every other measure takes: the samples for a per-sample loss;
each counted target for cross-entropy with ignored entries (``ignore_index``) or with one class per position
(segmentation maps); each counted label token for a Hugging Face model's own token loss (labels ≠ −100,
shifted by one for causal language models: token t's loss is the cross-entropy of the logits at t − 1). A
token, not a sequence, is the sample there: the model's loss is the mean over tokens, and ⟨θ, ∇ℓ_u⟩ is taken
per term of that mean. For a model's own loss the per-token cross-entropy is recomputed from its ``.logits``
(the model's loss of the first batch is checked to be their mean); an own loss that is no cross-entropy of
integer labels does not apply (pass ``loss_fn=``).

hessgap computes the definition directly, over every trainable parameter, biases and BatchNorm's affine
parameters included: ⟨θ, ∇_θ ℓ_u⟩ is the derivative of unit u's loss along the ray t ↦ (1 + t)θ, one
forward-mode product (``torch.func.jvp`` with tangent θ) per batch, then ⟨∂ℓ_u/∂f, ḟ⟩ (a unit's
cross-entropy depends on its own logits only). Attention runs on PyTorch's math kernels during the product,
as in the curvature calls (the fused kernels have no forward-mode rule; the notes say so), and any other op
without one is named. With biases the homogeneity identity no longer holds, but the definition does, and it
stays invariant under every rescaling of the weights that leaves the function unchanged (the gradient
rescales inversely). The model is in eval mode; the value is the mean over the units, with the standard error
of that mean. On several ranks both are taken over every rank's units (sums across the ranks). For a
half-precision model ∂ℓ_u/∂f is taken in float32 (near a minimum the softmax's 1 − p is below bfloat16's
resolution of p).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp

from .._state import preserved
from ..curvature.batches import IGNORE_INDEX, Batch, ignore_index_of, is_causal_lm
from ..curvature.objective import LossOverData, output_tensor
from ..curvature.second_order import SecondOrderRules, modules_calling
from .context import Context, NotApplicable, Outcome, trainable


def directional_terms(ctx: Context, rules: SecondOrderRules | None = None) -> torch.Tensor:
    """⟨θ, ∇_θ ℓ_u⟩ for every unit u of this rank's data (float64), the model in eval mode; ``rules`` collects
    the notes of the forward-mode passes (attention rerouted)."""
    objective = ctx.objective()
    model = ctx.model
    params = {name: p.detach() for name, p in trainable(model)}
    rules = rules if rules is not None else SecondOrderRules()
    current: list[Batch] = []

    def locate(op: str) -> list[str]:  # the modules that call an op without a forward-mode rule
        try:
            return modules_calling(model, lambda: model(*current[-1].args, **current[-1].kwargs), op) if current else []
        except Exception:  # noqa: BLE001 - naming the module is a courtesy: the error itself is raised anyway
            return []

    terms = []
    with preserved(model, train_mode=False, parameters=False), rules.active(model, locate=locate):
        for batch in objective.batches():
            current[:] = [batch]
            objective.check_own_loss(batch)  # a model's own loss: the mean over the units counted here

            def outputs(p, batch=batch):
                return output_tensor(functional_call(model, p, batch.args, batch.kwargs))

            with torch.no_grad(), warnings.catch_warnings(), rules.watch(), objective.naming_failures(batch):
                # torch registers its forward-mode decompositions through torch.jit.script on the first jvp
                # and warns that torch.jit.script is deprecated: its own business, not the caller's
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
                out, tangent = jvp(outputs, (params,), (params,))
            if out.dim() == 0:
                raise NotApplicable("it needs per-sample outputs (a leading sample dimension)")
            terms.append(unit_terms(objective, batch, out, tangent))
    return torch.cat(terms) if terms else torch.zeros(0, dtype=torch.float64)


def unit_terms(objective: LossOverData, batch: Batch, out: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """⟨∂ℓ_u/∂f, ḟ⟩ for each unit u of the batch (float64, one entry per unit that :func:`units` counts), from
    the outputs f and their derivative ḟ along θ."""
    leaf = out.detach().to(objective.accumulation_dtype).requires_grad_(True)
    own_loss = objective.loss_fn is None and bool(batch.kwargs)
    with torch.enable_grad():
        if own_loss:
            logits, labels, position = token_layout(objective, batch, leaf)
            total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                    ignore_index=IGNORE_INDEX, reduction="sum")
        else:
            total = objective.loss_of_outputs(leaf, batch) * batch.weight  # Σ_u ℓ_u for a mean over the units
        (grad,) = torch.autograd.grad(total, leaf)
    products = grad.double() * tangent.double()
    if own_loss:  # Hugging Face layout: classes last, one unit per counted label token
        return products.sum(-1)[position][labels != IGNORE_INDEX]
    targets = batch.targets
    ignore = ignore_index_of(objective.loss_fn if objective.loss_fn is not None else F.cross_entropy)
    if ignore is not None and targets is not None and not targets.is_floating_point():
        # cross-entropy of class indices: one unit per counted target, classes in dimension 1 (0 unbatched)
        return products.sum(1 if products.dim() >= 2 else 0)[targets != ignore]
    return products.reshape(out.shape[0], -1).sum(1)  # one unit per sample


def token_layout(objective: LossOverData, batch: Batch, logits: torch.Tensor):
    """(logits, labels, position) of a Hugging Face model's own token loss: the label of position t is compared
    with ``logits[position][t]`` (shifted by one for a causal language model, as the model's loss is).

    Raises :class:`NotApplicable` when the loss is no cross-entropy of integer labels over the logits' last
    dimension (regression or multi-label heads, other shapes): its per-unit losses are unknown."""
    labels = batch.targets
    if labels is None or labels.is_floating_point() or labels.dim() == 0:
        raise NotApplicable(
            "it needs each unit's loss, and the model's own loss is not a cross-entropy of integer labels (float "
            "or missing labels); pass loss_fn=... that computes the batch's mean loss from the outputs"
        )
    position = (slice(None),) * labels.dim()
    if labels.dim() >= 2 and is_causal_lm(objective.model):
        position = (slice(None), slice(None, -1))
        labels = labels[:, 1:]
    logits = logits[position]
    if logits.shape[:-1] != labels.shape:
        raise NotApplicable(
            f"it needs each unit's loss, and the model's own loss compares labels of shape {tuple(batch.targets.shape)} "
            f"with logits of shape {tuple(logits.shape)} in a way hessgap does not know; pass loss_fn=... that "
            "computes the batch's mean loss from the outputs"
        )
    return logits, labels, position


def fisher_rao(ctx: Context) -> Outcome:
    """‖θ‖²_fr = mean over the units (of every rank) of ⟨θ, ∇_θ ℓ_u⟩², with its standard error."""
    rules = SecondOrderRules()
    squares = ctx.agreed(lambda: directional_terms(ctx, rules)).pow(2)
    total, count = ctx.ranks.sum_numbers([float(squares.sum()), len(squares)])
    if count == 0:
        raise NotApplicable("every target is ignored: there is no unit to average over")
    value = total / count
    # the spread about the mean of all ranks' units, summed across the ranks in a second reduction
    (spread,) = ctx.ranks.sum_numbers([float((squares - value).pow(2).sum())])
    count = int(count)
    stderr = math.sqrt(spread / (count - 1) / count) if count > 1 else None
    return Outcome(value, stderr, details={"units": count}, notes=list(rules.notes))
