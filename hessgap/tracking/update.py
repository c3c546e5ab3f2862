"""The optimizer's next update, computed without taking it: the direction critical sharpness searches along.

:func:`next_update` runs the optimizer's own ``step`` on a copy of it whose parameters are clones of the
model's, with the given gradients; the copy's parameters move and the optimizer, its state and the model's
weights stay exactly as they were. This works for any ``torch.optim.Optimizer`` whose step depends only on its
parameters, their gradients and its state (SGD, Adam, AdamW, RMSprop, Adagrad, ...), with the optimizer's
real hyper-parameters, momentum buffers and moment estimates.

:func:`gd_stability_factor` is the edge of stability of (heavy-ball / Nesterov) gradient descent: the largest
η·λ at which a quadratic mode of curvature λ does not grow.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from ..errors import HessgapError


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` behind a wrapper (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``): the object whose ``optimizer`` attribute it wraps, until a torch one."""
    inner, seen = optimizer, 0
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer") and seen < 8:
        inner, seen = inner.optimizer, seen + 1
    if not isinstance(inner, torch.optim.Optimizer):
        raise HessgapError(
            f"optimizer must be a torch.optim.Optimizer (or a wrapper with .optimizer), got {type(optimizer).__name__}"
        )
    return inner


def learning_rate(optimizer) -> float:
    """The learning rate of the optimizer's first parameter group (the one its next step uses)."""
    lr = unwrap_optimizer(optimizer).param_groups[0].get("lr")
    if lr is None:
        raise HessgapError("the optimizer's first parameter group has no 'lr'; pass the update as direction=")
    return float(lr)


def next_update(optimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], *,
                unit_lr: bool = False) -> list[torch.Tensor]:
    """θ_next − θ for each of ``params`` if the optimizer stepped now with gradients ``grads``.

    ``unit_lr=True``: the step per unit of the first group's learning rate instead, taken with every group's
    learning rate divided by the first one's (all set to 1 when the first is 0, where the real step vanishes,
    e.g. at the end of a linear decay). The optimizers' steps are linear in the learning rate (decoupled weight
    decay included), so this is the real step divided by the learning rate, also when that is 0.

    The step runs on a deep copy of the optimizer whose parameters are detached clones (its state maps to
    the clones too), with the class's own ``step``: an instance-level wrapper (an LR scheduler's step counter)
    and the optimizer's own step hooks belong to the real training and are not called. Parameters of the
    optimizer outside ``params`` get no gradient, so its step leaves them alone; parameters outside the
    optimizer do not move (their update is zero).
    """
    inner = unwrap_optimizer(optimizer)
    grad_of = {id(p): g for p, g in zip(params, grads)}
    clones: dict[int, torch.Tensor] = {}
    for group in inner.param_groups:
        for p in group["params"]:
            clone = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            g = grad_of.get(id(p))
            clone.grad = None if g is None else g.detach().to(dtype=p.dtype).reshape(p.shape).clone()
            clones[id(p)] = clone
    memo = dict(clones)  # deepcopy maps every parameter (list entries and state keys alike) to its clone
    try:
        shadow = copy.deepcopy(inner, memo)
    except Exception as exc:  # any object the optimizer holds may refuse to be copied
        raise HessgapError(
            f"cannot copy the optimizer {type(inner).__name__} to compute its next update without taking it "
            f"({type(exc).__name__}: {exc}); pass the update direction yourself (direction=)"
        ) from exc
    shadow.__dict__.pop("step", None)  # an instance-level wrapper would call the real optimizer
    if unit_lr:
        first = float(shadow.param_groups[0]["lr"])
        for group in shadow.param_groups:
            group["lr"] = float(group["lr"]) / first if first > 0 else 1.0
    for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        if isinstance(getattr(shadow, hooks, None), dict):
            getattr(shadow, hooks).clear()
    with torch.no_grad():
        type(shadow).step(shadow)
    return [(clones[id(p)].detach() - p.detach()) if id(p) in clones else torch.zeros_like(p) for p in params]


def gd_stability_factor(optimizer) -> float:
    """c such that SGD with this optimizer's settings is stable on a quadratic mode of curvature λ iff η·λ < c.

    Plain gradient descent: c = 2. Heavy ball (``momentum`` β, ``dampening`` d; PyTorch's SGD applies
    θ ← θ − η·b with b ← β·b + (1 − d)·g): c = 2(1 + β)/(1 − d). Nesterov (d = 0): c = 2(1 + β)/(1 + 2β).
    Weight decay adds to the curvature itself and is left out. Other optimizers raise: their stability is
    not a bound on the Hessian's top eigenvalue (use critical sharpness, which follows their real update).
    """
    inner = unwrap_optimizer(optimizer)
    if type(inner) is not torch.optim.SGD:
        raise HessgapError(
            f"eos_ratio is the edge-of-stability ratio of SGD (λmax·η over its stability limit), but the optimizer is "
            f"{type(inner).__name__}; for adaptive optimizers track critical_sharpness, whose ratio η·λc/2 "
            "(details 'step_fraction') follows their real update"
        )
    group = inner.param_groups[0]
    beta, dampening = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
    if group.get("nesterov", False):
        return 2.0 * (1.0 + beta) / (1.0 + 2.0 * beta)
    if dampening >= 1.0:
        raise HessgapError("SGD with dampening = 1 never moves the weights; the stability ratio is undefined")
    return 2.0 * (1.0 + beta) / (1.0 - dampening)
