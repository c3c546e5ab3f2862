"""The generalized Cauchy point of L-BFGS-B (Byrd, Lu, Nocedal & Zhu 1995, Section 4), vectorized.

Along the projected steepest-descent path x(t) = P(x − t·g, l, u) the quadratic model
m(x(t)) = gᵀ(x(t) − x) + ½ (x(t) − x)ᵀB(x(t) − x) is piecewise quadratic in t, with a breakpoint tᵢ where
variable i reaches its bound. The Cauchy point is the first local minimizer of m along the path.

scipy's ``cauchy`` visits the breakpoints one at a time (from a heap), updating f′, f″ and the 2c-vectors
p = Wᵀd and c = Wᵀ(x(t) − x) at each. Here the breakpoints are sorted and every segment's quantities come
at once from cumulative sums over that order. With the first j breakpoints passed (t₀ = 0), the segment
[t_j, t_{j+1}] has direction d_j (d = −g with the passed variables zeroed) and

    R_j  = ‖d_j‖²  = ‖d‖² − Σ_{k≤j} d_k²
    p_j  = Wᵀd_j   = p₀ − Σ_{k≤j} w_k d_k                         (w_k: row k of W)
    c_j  = Wᵀ(x(t_j) − x) = Σ_{k≤j} w_k d_k t_k + t_j p_j
    f′_j = gᵀd_j + d_jᵀB(x(t_j) − x) = R_j (θ t_j − 1) − p_jᵀM c_j
    f″_j = d_jᵀB d_j = θ R_j − p_jᵀM p_j

(B = θI − W M Wᵀ) and the model's minimizer lies in the segment when Δt* = −f′_j/f″_j < t_{j+1} − t_j. scipy floors
f″ at ε·f″₀ after the first segment; so does this code (per segment: scipy also carries the floored
value into the next f′, which differs only when the floor bites).

Usually only a small fraction of the breakpoints is passed, so the search takes the smallest ones with
``topk`` (k growing 64-fold while the Cauchy point lies beyond them, a full sort as the last resort) and
scans their segments in chunks that double, so the work follows the breakpoints passed rather than n and
the cumulative sums are never held for all n at once. With an empty memory (B = θI) the Cauchy point
has a closed form, P(x − g/θ), and needs no sort at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._compact_bfgs import CompactLbfgs

_EPS = torch.finfo(torch.float64).eps
_FIRST_BREAKPOINTS = 1024  # the first topk's k, and the first chunk of segments scanned
_ESCALATION = 64  # k grows by this factor while x^c lies beyond the k smallest breakpoints
_CHUNK = 65536  # the most segments scanned at once


@dataclass
class CauchyPoint:
    """x^c, c = Wᵀ(x^c − x) (float64, CPU) and the variables free at x^c (scipy's iwhere ≤ 0)."""

    x: torch.Tensor
    c: torch.Tensor
    free: torch.Tensor


def generalized_cauchy_point(
    x: torch.Tensor,
    g: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    fixed: torch.Tensor,
    bfgs: CompactLbfgs,
) -> CauchyPoint:
    """The generalized Cauchy point from x with gradient g for the model B held in ``bfgs``;
    ``fixed`` marks the variables with lower == upper."""
    to_lower, to_upper = x - lower, upper - x
    at_lower, at_upper = to_lower <= 0, to_upper <= 0
    # variables that cannot move along −g: at a bound that −g points out of, or fixed (iwhere 1, 2, 3)
    active = fixed | (at_lower & (g >= 0)) | (~at_lower & at_upper & (g <= 0))
    moving = ~active & (g != 0)
    still = ~active & (g == 0)  # free, but the path does not move them (iwhere −3)
    # 0/1 masks in arithmetic rather than torch.where, which is several times slower on the CPU; the
    # results are exact: d = −g on the moving variables, 0 elsewhere
    moves = moving.to(g.dtype)
    d = -g * moves
    breakpoints = distance_to_box(to_lower, to_upper, d, moves)

    moving_count = int(moves.sum())
    if bfgs.size == 0:
        # B = θI: f′_j/f″_j = t_j − 1/θ, so the minimizer is at t = 1/θ, past exactly the breakpoints ≤ 1/θ:
        # x^c = P(x − g/θ), no sort needed
        t = 1.0 / bfgs.theta
        passed = moving & (breakpoints <= t)
        passed_index = torch.nonzero(passed).squeeze(1)
        c = torch.zeros(0, dtype=torch.float64)
    elif moving_count == 0:
        t, passed, passed_index = 0.0, moving, torch.zeros(0, dtype=torch.long, device=x.device)
        c = torch.zeros(2 * bfgs.size, dtype=torch.float64)
    else:
        order, found = _first_minimizer(_Path(d, breakpoints, bfgs), breakpoints, moving_count)
        t, c = found.t, found.c
        passed_index = order[: found.passed]
        passed = torch.zeros_like(moving)
        passed[passed_index] = True
    # the clamp keeps rounding from leaving the box; the passed variables sit exactly on their bounds
    x_cauchy = torch.clamp(x + t * d, lower, upper)
    x_cauchy[passed_index] = torch.where(d[passed_index] > 0, upper[passed_index], lower[passed_index])
    return CauchyPoint(x_cauchy, c, still | (moving & ~passed))


def distance_to_box(
    to_lower: torch.Tensor, to_upper: torch.Tensor, d: torch.Tensor, moves: torch.Tensor
) -> torch.Tensor:
    """How far along d each variable can go before it meets a bound, +inf where d = 0 (``moves`` = 0).

    The larger of (u − x)/d and (l − x)/d is the bound ahead (the other is ≤ 0), as scipy divides it;
    where d = 0 the divisor becomes 1 and a floor of +inf replaces the (then finite) ratio."""
    divisor = d + (1 - moves)
    ratio = torch.maximum(to_upper / divisor, -to_lower / divisor)
    return torch.clamp(ratio, min=(0.5 - moves) * torch.inf)


def _first_minimizer(path: _Path, breakpoints: torch.Tensor, moving_count: int) -> tuple[torch.Tensor, _Found]:
    """The sorted order of (at least) the passed breakpoints, and the segment that holds x^c.

    The k smallest breakpoints come from ``topk`` with k = 1024, 64·1024, … until x^c lies among them (a
    full sort at the end); each order is scanned in chunks that double, so the work follows the number
    of breakpoints passed rather than n."""
    k, scanned, passed = min(_FIRST_BREAKPOINTS, moving_count), 0, path.start()
    while True:
        if k < moving_count:
            order = torch.topk(breakpoints, k, largest=False, sorted=True).indices
        else:
            order = torch.sort(breakpoints, stable=True).indices[:moving_count]
        if scanned and not bool(breakpoints[order[scanned]] > passed.t_last):
            scanned, passed = 0, path.start()  # equal breakpoints straddle the scanned part: start over
        while scanned < len(order):
            chunk = order[scanned : scanned + min(max(scanned, _FIRST_BREAKPOINTS), _CHUNK)]
            found = path.scan(chunk, scanned, passed)
            if isinstance(found, _Found):
                return order, found
            passed, scanned = found, scanned + len(chunk)
        if k == moving_count:
            return order, path.far_end(passed, moving_count)
        k = min(k * _ESCALATION, moving_count)


class _Found(NamedTuple):
    passed: int  # breakpoints passed before the segment that holds x^c
    t: float  # x^c = x(t)
    c: torch.Tensor  # Wᵀ(x^c − x), float64 on the CPU


class _Sums(NamedTuple):
    """Sums over the breakpoints passed so far, carried from one chunk of segments to the next."""

    d_squared: torch.Tensor  # Σ d_k²
    wd: torch.Tensor  # Σ w_k d_k
    wdt: torch.Tensor  # Σ w_k d_k t_k
    t_last: float  # the last breakpoint passed (0 before any)


class _Path:
    """The projected steepest-descent path's segments and the model's f′ and f″ on each."""

    def __init__(self, d: torch.Tensor, breakpoints: torch.Tensor, bfgs: CompactLbfgs):
        self.d, self.breakpoints, self.bfgs = d, breakpoints, bfgs
        self.device = d.device
        self.theta = bfgs.theta
        self.norm2 = float(torch.dot(d, d))
        self.curvature_floor = _EPS * self.theta * self.norm2  # ε·f″ of the first segment without W M Wᵀ
        self.p0 = bfgs.transpose_times(d).to(self.device)
        self.middle = bfgs.middle_on_device()

    def start(self) -> _Sums:
        zeros = torch.zeros_like(self.p0)
        return _Sums(torch.zeros((), dtype=torch.float64, device=self.device), zeros, zeros, 0.0)

    def scan(self, order: torch.Tensor, first: int, passed: _Sums) -> _Found | _Sums:
        """Examine the segments that end at the breakpoints ``order`` (sorted positions first, first+1, …).
        Returns where x^c lies when it is among them, else the sums with all of them passed."""
        t = self.breakpoints[order].to(torch.float64)
        dk = self.d[order].to(torch.float64)
        wd = self.bfgs.rows(order) * dk.unsqueeze(1)
        wdt = wd * t.unsqueeze(1)
        # sums over the breakpoints passed before each segment: exclusive cumulative sums
        d_squared = passed.d_squared + torch.cumsum(dk * dk, 0) - dk * dk
        sum_wd = passed.wd + torch.cumsum(wd, 0) - wd
        sum_wdt = passed.wdt + torch.cumsum(wdt, 0) - wdt
        t_start = torch.cat([t.new_tensor([passed.t_last]), t[:-1]])

        remaining = self.norm2 - d_squared
        p = self.p0 - sum_wd
        c = sum_wdt + t_start.unsqueeze(1) * p
        mp = p @ self.middle
        slope = remaining * (self.theta * t_start - 1.0) - (mp * c).sum(1)
        curvature = self.theta * remaining - (mp * p).sum(1)
        floored = torch.clamp(curvature, min=self.curvature_floor)
        curvature = torch.cat([curvature[:1], floored[1:]]) if first == 0 else floored
        step = -slope / curvature
        inside = step < t - t_start
        if bool(inside.any()):
            j = int(torch.argmax(inside.to(torch.uint8)))  # the first segment that holds a minimizer
            dt = max(float(step[j]), 0.0)
            return _Found(first + j, float(t_start[j]) + dt, (c[j] + dt * p[j]).cpu())
        return _Sums(d_squared[-1] + dk[-1] ** 2, sum_wd[-1] + wd[-1], sum_wdt[-1] + wdt[-1], float(t[-1]))

    def far_end(self, passed: _Sums, count: int) -> _Found:
        """Every moving variable reaches its bound: x^c is the end of the path."""
        t = passed.t_last
        return _Found(count, t, (passed.wdt + t * (self.p0 - passed.wd)).cpu())
