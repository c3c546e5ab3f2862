"""Rescalings of the weights that leave the network's function unchanged, built on a copy of the model and
verified on the data: what the invariance check of :func:`hessgap.measures` measures each measure against
(Dinh et al. 2017, "Sharp minima can generalize for deep nets": such rescalings make any Hessian-based or
ε-box sharpness as large or small as one likes without changing the function).

Two symmetries are found by walking the model's leaf modules in order (plain layer stacks, ``nn.Sequential``):

- **ReLU** (positive homogeneity): a producer (Linear/Conv, or BatchNorm's affine output) followed by ReLU or
  LeakyReLU, then only layers that commute with a positive scale (max or average pooling, Flatten, Unflatten,
  Dropout, Identity), then a Linear/Conv consumer: the producer's weight and bias are multiplied by α > 0 and
  the consumer's weight by 1/α.
- **BatchNorm** (scale invariance of normalization): a Linear/Conv immediately followed by BatchNorm: its
  weight and bias are multiplied by β > 0; BatchNorm's running mean by β, running variance and ε by β², so
  the normalized output is the same in eval mode and in train mode alike (the ε term rescales too, so the
  identity is exact, not only approximate).

- **Attention** (GL(h) of each head, :mod:`.attention`): a head's query/key blocks (G, H) become (G·A, H·A⁻ᵀ)
  and its value/output blocks likewise, A an invertible h × h matrix drawn per head (fixed seed) with
  singular values spread geometrically over [1/α, α], α the ReLU factor; the second copy uses A⁻¹.

The copy's outputs are compared with the model's on every batch (eval mode; on several ranks, on every rank's
shard); a rescaling whose outputs differ beyond float rounding (a model whose module order is not its data
flow: residual connections, custom forwards) is refused with the reason. So is a copy whose weights did not
move: measured against an identical copy every measure would look invariant. For the same reason factors
closer to 1 than 2 (or 1/2) are refused (:func:`check_factor`): a quantity that scales with the factor would
move by less than half and a small change could pass for invariance. The user's model is never touched.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .. import _checks
from .._state import preserved
from ..curvature.objective import LossOverData, output_tensor
from ..distributed import Ranks
from ..errors import HessgapError
from .attention import block, find_heads, write_block

RELU_FACTOR = 3.0
BATCHNORM_FACTOR = 0.25
#: The least max(factor, 1/factor) the check takes (see the module docstring).
MIN_FACTOR = 2.0
#: The least relative change of some rescaled parameter for a copy to count as rescaled at all.
MIN_MOVE = 1e-2
_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU)
_BATCHNORM = nn.modules.batchnorm._BatchNorm
_PASS_THROUGH = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                 nn.Flatten, nn.Unflatten, nn.Dropout, nn.Identity)


class NoSymmetry(Exception):
    """The model has no function-preserving rescaling hessgap can build (``str(exc)`` says why)."""


def check_factor(value, name: str) -> float:
    """A rescaling factor the invariance check can use: finite, > 0, and at least 2 (or at most 1/2)."""
    value = _checks.positive_number(value, name, "the scale of the invariance check's rescaling")
    if max(value, 1 / value) < MIN_FACTOR:
        raise HessgapError(
            f"{name}={value!r} is too close to 1 for the invariance check: the rescaled copy would be (nearly) the "
            f"model itself and every measure would look invariant; use a factor ≥ {MIN_FACTOR:g} or ≤ "
            f"1/{MIN_FACTOR:g} (default {RELU_FACTOR:g} for ReLU, {BATCHNORM_FACTOR:g} for BatchNorm)"
        )
    return value


def check_rtol(rtol, factors: tuple[float, ...]) -> float:
    """``invariance_rtol``: > 0 and below 1 − 1/f for the factors f, the change of a quantity that scales with
    the factor (a larger tolerance would call such a quantity invariant)."""
    rtol = _checks.positive_number(rtol, "invariance_rtol", "the relative change below which a measure is invariant")
    weakest = min(max(f, 1 / f) for f in factors)
    if rtol >= 1 - 1 / weakest:
        raise HessgapError(
            f"invariance_rtol={rtol!r} is too large for the factors {', '.join(f'{f:g}' for f in factors)}: a "
            f"measure proportional to a factor of {weakest:g} would move by {1 - 1 / weakest:.3g} and still count "
            f"as invariant; use a tolerance below {1 - 1 / weakest:.3g} (default 0.05)"
        )
    return rtol


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if not list(m.children())]


def _scalable(module: nn.Module) -> bool:
    """A producer whose output scales with its weight and bias: an affine layer, or an affine BatchNorm."""
    if isinstance(module, _AFFINE):
        return module.weight.requires_grad
    return isinstance(module, _BATCHNORM) and module.affine and module.weight.requires_grad


def find_symmetries(model: nn.Module) -> dict[str, list]:
    """The (producer, consumer) pairs of the ReLU symmetry and the (layer, BatchNorm) pairs of the BatchNorm
    symmetry, by module name; and the attention heads' (G, H) pairs (:class:`.attention.HeadPair`)."""
    leaves = _leaves(model)
    relu, batchnorm = [], []
    for i, (name, module) in enumerate(leaves):
        following = leaves[i + 1] if i + 1 < len(leaves) else None
        if following is None:
            continue
        if isinstance(module, _AFFINE) and isinstance(following[1], _BATCHNORM) and module.weight.requires_grad:
            batchnorm.append((name, following[0]))
        if _scalable(module) and isinstance(following[1], _ACTIVATIONS):
            j = i + 2
            while j < len(leaves) and isinstance(leaves[j][1], _PASS_THROUGH):
                j += 1
            if j < len(leaves) and isinstance(leaves[j][1], _AFFINE) and leaves[j][1].weight.requires_grad:
                relu.append((name, leaves[j][0]))
    return {"relu": relu, "batchnorm": batchnorm, "attention": find_heads(model)[0]}


def head_transform(h: int, factor: float, index: int, dtype: torch.dtype) -> torch.Tensor:
    """The invertible h × h matrix A of head pair ``index``: U·diag(σ)·Vᵀ with random orthogonal U, V (seeded
    by the index) and σ spread geometrically over [1/f, f], f = max(factor, 1/factor); its inverse when
    factor < 1, so the two copies of the check move the other way."""
    generator = torch.Generator().manual_seed(10_007 + index)
    u, _ = torch.linalg.qr(torch.randn(h, h, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(h, h, generator=generator, dtype=torch.float64))
    f = max(factor, 1 / factor)
    sigma = torch.logspace(-1, 1, h, base=f, dtype=torch.float64) if h > 1 else torch.full((1,), f, dtype=torch.float64)
    a = u @ torch.diag(sigma) @ v.T
    return (a if factor >= 1 else torch.linalg.inv(a)).to(dtype)


@torch.no_grad()
def _apply(model: nn.Module, pairs: dict, relu_factor: float, batchnorm_factor: float) -> None:
    modules = dict(model.named_modules())
    for producer, consumer in pairs["relu"]:
        modules[producer].weight.mul_(relu_factor)
        if modules[producer].bias is not None:
            modules[producer].bias.mul_(relu_factor)
        modules[consumer].weight.div_(relu_factor)
    for layer, norm in pairs["batchnorm"]:
        modules[layer].weight.mul_(batchnorm_factor)
        if modules[layer].bias is not None:
            modules[layer].bias.mul_(batchnorm_factor)
        bn = modules[norm]
        if bn.running_mean is not None:
            bn.running_mean.mul_(batchnorm_factor)
            bn.running_var.mul_(batchnorm_factor**2)
        bn.eps = bn.eps * batchnorm_factor**2
    params = dict(model.named_parameters())
    for index, pair in enumerate(pairs.get("attention", ())):
        g, h = block(params, pair.g), block(params, pair.h)
        a = head_transform(g.shape[1], relu_factor, index, torch.float64)
        write_block(params, pair.g, (g.double() @ a).to(g.dtype))
        write_block(params, pair.h, (h.double() @ torch.linalg.inv(a).T).to(h.dtype))


@torch.no_grad()
def _outputs(model: nn.Module, batches) -> list[torch.Tensor]:
    objective = LossOverData(model, batches)
    with preserved(model, train_mode=False, parameters=False):
        return [output_tensor(model(*b.args, **b.kwargs)).detach() for b in objective.batches()]


def describe(pairs: dict, relu_factor: float, batchnorm_factor: float) -> str:
    parts = []
    if pairs["relu"]:
        parts.append(f"ReLU: {len(pairs['relu'])} producer/consumer pair(s) ×{relu_factor:g} / ÷{relu_factor:g} "
                     f"({', '.join(f'{a}→{b}' for a, b in pairs['relu'])})")
    if pairs["batchnorm"]:
        parts.append(f"BatchNorm: {len(pairs['batchnorm'])} layer(s) before BatchNorm ×{batchnorm_factor:g} "
                     f"({', '.join(a for a, _ in pairs['batchnorm'])})")
    heads = pairs.get("attention", ())
    if heads:
        f = max(relu_factor, 1 / relu_factor)
        parts.append(f"attention: {len(heads)} head block pair(s) (G, H) → (G·A, H·A⁻ᵀ), A ∈ GL(h) with singular "
                     f"values in [1/{f:g}, {f:g}]{' (inverted)' if relu_factor < 1 else ''} "
                     f"({', '.join(sorted({p.module for p in heads}))})")
    return "; ".join(parts)


def output_tolerance(dtype: torch.dtype) -> float:
    """The largest relative change of the outputs a function-preserving rescaling may show in ``dtype``:
    1000 roundings, but at most 5 % (1000 roundings of bfloat16 are 8 times the outputs; a rescaled bfloat16
    network's outputs move by about 0.5 %, a rescaling that breaks a residual connection's by far more)."""
    return min(1e3 * torch.finfo(dtype).eps, 0.05)


def _output_change(model: nn.Module, twin: nn.Module, batches) -> torch.Tensor:
    """The largest |output difference| between the model and its copy over the batches, and the largest
    |output| (float64)."""
    change, scale = 0.0, 0.0
    for a, b in zip(_outputs(model, batches), _outputs(twin, batches)):
        change = max(change, float((a - b).abs().max()))
        scale = max(scale, float(a.abs().max()))
    return torch.tensor([change, scale], dtype=torch.float64)


def _moved(model: nn.Module, twin: nn.Module) -> float:
    """The largest relative change ‖p′ − p‖ / ‖p‖ of a trainable parameter between the model and its copy."""
    moved = 0.0
    for p, q in zip(model.parameters(), twin.parameters()):
        norm = float(p.detach().double().norm())
        if p.requires_grad and norm > 0:
            moved = max(moved, float((q.detach().double() - p.detach().double()).norm()) / norm)
    return moved


def rescaled_copy(model: nn.Module, batches, relu_factor: float = RELU_FACTOR,
                  batchnorm_factor: float = BATCHNORM_FACTOR) -> tuple[nn.Module, str, float]:
    """A deep copy of ``model`` with every ReLU and BatchNorm rescaling applied, its description, and the
    largest change of the outputs over the data relative to their size (checked below float rounding).

    Raises :class:`NoSymmetry` when the model has neither symmetry, when the copy's weights did not move, or
    when the rescaled copy's outputs differ from the model's (on any rank: every rank decides alike)."""
    check_factor(relu_factor, "relu_factor")
    check_factor(batchnorm_factor, "batchnorm_factor")
    pairs = find_symmetries(model)
    if not pairs["relu"] and not pairs["batchnorm"] and not pairs["attention"]:
        raise NoSymmetry("the model has no ReLU between two layers, no layer before a BatchNorm and no attention "
                         "heads, so no function-preserving rescaling to check against")
    twin = copy.deepcopy(model)
    _apply(twin, pairs, relu_factor, batchnorm_factor)
    moved = _moved(model, twin)
    if moved < MIN_MOVE:
        raise NoSymmetry(
            f"the rescaled copy's weights differ from the model's by {moved:.2g} of their size at most (the layers "
            f"it rescales are zero): measured against the model itself every measure would look invariant"
        )
    ranks = Ranks.resolve()
    local = ranks.together(_output_change, model, twin, batches)  # every rank raises if one's batch fails
    change, scale = (max(float(t[i]) for t in ranks.gather(local)) for i in (0, 1))
    relative = change / max(scale, 1e-30)
    if not math.isfinite(relative) or relative > output_tolerance(next(model.parameters()).dtype):
        raise NoSymmetry(
            f"rescaling the layers in module order changed the outputs (by {relative:.2g} of their size): the "
            "model's module order is not its data flow (residual connections or a custom forward), so hessgap "
            "cannot build a function-preserving rescaling for it"
        )
    return twin, describe(pairs, relu_factor, batchnorm_factor), relative
