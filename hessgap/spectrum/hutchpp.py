"""Hutch++ and adaptive Hutch++: trace estimates that deflate the top of the spectrum first.

Hutch++ (Meyer, Musco, Musco & Woodruff 2021) splits m products in three: a sketch Y = A·S of s = m/3
Rademacher probes, Q an orthonormal basis of its range, tr(QᵀAQ) exactly from s more products, and
Hutchinson's estimate of the rest, tr((I − QQᵀ)A(I − QQᵀ)), from the l = m − 2s remaining probes g,
each deflated (w = (I − QQᵀ)g, estimate wᵀAw). When a few eigenvalues dominate, Q catches them and the
Hutchinson part's variance, 2·‖(I − QQᵀ)A(I − QQᵀ)‖_F² per probe, is that of the small remainder: the error
falls as 1/m instead of 1/√m.

The adaptive variant chooses s from the spectrum it sees, in the spirit of Persson, Cortinovis & Kressner
(2022): the sketch grows by blocks of b probes; each new block's products, before they join the basis,
estimate the remainder's squared Frobenius norm R(s) = ‖(I − QQᵀ)A‖_F² (E‖(I − QQᵀ)A·Ω‖_F² = b·R for b
Rademacher columns). The Hutchinson part's variance is then about 2·R(s)/(m − 2s), and the sketch stops
growing once blocks no longer shrink R by more than the probes they take from the Hutchinson part,
R(s + b)/R(s) > (m − 2s − 2b)/(m − 2s), :data:`PATIENCE` blocks in a row (R the smallest seen so far). No
product is wasted: the measuring block joins the basis.

The confidence interval has Hutchinson's semantics: a two-sided Student-t interval of the l per-probe
estimates of the remainder (the low-rank part is exact and adds no variance), shifted by tr(QᵀAQ).
"""

from __future__ import annotations

import torch

from ..curvature.probes import rademacher

#: Adaptive Hutch++ stops growing its sketch after this many blocks in a row that did not pay: the estimate of R
#: from one block of a few probes is noisy, and one unlucky block must not stop it before the dominant eigenvalues.
PATIENCE = 2
#: The fewest Hutchinson probes either variant leaves for the remainder (its mean and its spread).
MIN_RESIDUAL_PROBES = 2


def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the rows of ``Y`` (float64)."""
    q, _ = torch.linalg.qr(Y.double().T)
    return q.T


def _deflate(Q: torch.Tensor | None, Z: torch.Tensor) -> torch.Tensor:
    """(I − QQᵀ)·z for the rows z of Z (twice, for the rounding of a nearly complete basis)."""
    if Q is None or Q.shape[0] == 0:
        return Z
    W = Z.double()
    for _ in range(2):
        W = W - (W @ Q.T) @ Q
    return W.to(Z.dtype)


def _sketch(operator, probes: int, generator, adaptive: bool):
    """The basis Q (rows, float64) and the products spent on it."""
    n, dtype, device = operator.n, operator.dtype, operator.device
    max_sketch = (probes - MIN_RESIDUAL_PROBES) // 2
    if not adaptive:
        s = min(max(probes // 3, 0), max_sketch, n)
        if s == 0:
            return None
        return _orthonormal(operator.matmat(rademacher(s, n, dtype=dtype, device=device, generator=generator)))
    block = max(1, probes // 12)
    Q, residual, misses = None, None, 0
    while (0 if Q is None else Q.shape[0]) + block <= min(max_sketch, n):
        s = 0 if Q is None else Q.shape[0]
        Y = operator.matmat(rademacher(block, n, dtype=dtype, device=device, generator=generator)).double()
        remainder = float(_deflate(Q, Y).pow(2).sum()) / block  # R(s), measured before the block joins
        Q = _orthonormal(Y if Q is None else torch.cat([Q, _deflate(Q, Y)]))
        if residual is not None and remainder > residual * (probes - 2 * s) / (probes - 2 * (s - block)):
            misses += 1  # the last block did not pay for the Hutchinson probes it took
            if misses == PATIENCE:
                break
        else:
            misses = 0
        residual = remainder if residual is None else min(residual, remainder)
    return Q


def hutchpp_estimates(operator, probes: int, generator, *, adaptive: bool = False):
    """(tr(QᵀAQ), the remainder's per-probe estimates, the sketch size s): the pieces of the estimate."""
    Q = _sketch(operator, probes, generator, adaptive)
    low_rank, s = 0.0, 0
    if Q is not None:
        s = Q.shape[0]
        AQ = operator.matmat(Q.to(operator.dtype))
        low_rank = float(operator.row_dots(Q, AQ).sum())
    remaining = probes - 2 * s
    G = rademacher(remaining, operator.n, dtype=operator.dtype, device=operator.device, generator=generator)
    W = _deflate(Q, G).to(operator.dtype)
    estimates = [float(v) for v in operator.row_dots(W, operator.matmat(W))]
    return low_rank, estimates, s
