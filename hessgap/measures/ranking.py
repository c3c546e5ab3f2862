"""How well a measure ranks networks by their generalization gap: Kendall's τ, Jiang et al.'s granulated τ and
Dziugaite et al.'s sign-error.

- :func:`kendall_tau`: Kendall's τ_b (ties in either variable corrected for, as ``scipy.stats.kendalltau``):
  (concordant − discordant) / √((n₀ − n₁)(n₀ − n₂)) over all pairs.
- :func:`granulated_tau`: Jiang et al. 2020, Eq. 4 ("granulated Kendall's coefficient"): for each
  hyperparameter axis i, the mean of τ over the groups of networks that agree on every other axis (so only
  axis i varies within a group), ψ_i; and Ψ = the mean of ψ_i over the axes. A group with fewer than two
  networks, or whose τ is undefined (all values tied), is left out of its axis's mean.
- :func:`sign_error`: Dziugaite, Drouin, Neal, Rajkumar, Caballero, Wang, Mitliagkas & Roy 2020, "In search
  of robust measures of generalization", §3: over every pair of networks that differ in exactly one
  hyperparameter (the others, and the seed, equal), the error ½(1 − sgn(Δmeasure)·sgn(Δgap)): 0 when the
  measure moves with the gap, 1 against it, ½ when either does not move. Reported as the mean over all such
  pairs, the mean per hyperparameter (the "environments" of one changed hyperparameter), and as the robust
  sign-error the largest of those per-hyperparameter means (the worst hyperparameter; Dziugaite et al.
  take the worst case over environments, and also filter out pairs whose gaps differ within noise, which
  hessgap does not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's τ_b of the pairs (x_i, y_i); None when fewer than two pairs or either side is all tied."""
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if a is not None and b is not None
             and math.isfinite(float(a)) and math.isfinite(float(b))]
    n = len(pairs)
    if n < 2:
        return None
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx = pairs[i][0] - pairs[j][0]
            dy = pairs[i][1] - pairs[j][1]
            if dx == 0 and dy == 0:
                ties_x += 1
                ties_y += 1
            elif dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    total = n * (n - 1) // 2
    denominator = math.sqrt((total - ties_x) * (total - ties_y))
    if denominator == 0:
        return None
    return (concordant - discordant) / denominator


def granulated_tau(rows: Sequence[dict], axes: Sequence[str], measure: str, gap: str,
                   fixed: Sequence[str] = ()) -> dict:
    """Jiang et al.'s granulated τ of ``measure`` against ``gap`` over ``rows`` (dicts holding each axis's
    value, the measure and the gap). ``fixed`` names columns held fixed in every group without being an axis
    of their own (the seed: a group compares networks of one seed). Returns ``{"psi": {axis: ψ_i or None},
    "groups": {axis: groups used}, "value": Ψ or None}``; Ψ averages the axes whose ψ_i is defined."""
    psi, used = {}, {}
    for axis in axes:
        others = [a for a in axes if a != axis] + list(fixed)
        groups: dict[tuple, list[dict]] = {}
        for row in rows:
            groups.setdefault(tuple(_key(row.get(a)) for a in others), []).append(row)
        taus = []
        for members in groups.values():
            if len({_key(m.get(axis)) for m in members}) < 2:
                continue
            tau = kendall_tau([m.get(measure) for m in members], [m.get(gap) for m in members])
            if tau is not None:
                taus.append(tau)
        psi[axis] = sum(taus) / len(taus) if taus else None
        used[axis] = len(taus)
    defined = [v for v in psi.values() if v is not None]
    value = round(sum(defined) / len(defined), 12) + 0.0 if defined else None  # no -1e-17 for a τ that cancels
    return {"psi": psi, "groups": used, "value": value}


def _key(value):
    return tuple(value) if isinstance(value, list) else value


def _sign(value: float) -> int:
    return (value > 0) - (value < 0)


def sign_error(rows: Sequence[dict], axes: Sequence[str], measure: str, gap: str, fixed: Sequence[str] = ()) -> dict:
    """Dziugaite et al.'s sign-error of ``measure`` against ``gap`` over pairs of ``rows`` that differ in exactly
    one of ``axes`` (``fixed`` columns, the seed, equal too). Returns ``{"value": mean over every pair,
    "by_axis": {axis: mean or None}, "pairs": {axis: pairs}, "robust": max over the axes' means}``; None
    where there is no pair."""
    usable = [r for r in rows if r.get(measure) is not None and r.get(gap) is not None
              and math.isfinite(float(r[measure])) and math.isfinite(float(r[gap]))]
    errors: dict[str, list[float]] = {axis: [] for axis in axes}
    for i in range(len(usable)):
        for j in range(i + 1, len(usable)):
            a, b = usable[i], usable[j]
            if any(_key(a.get(f)) != _key(b.get(f)) for f in fixed):
                continue
            differing = [axis for axis in axes if _key(a.get(axis)) != _key(b.get(axis))]
            if len(differing) != 1:
                continue
            agreement = _sign(float(a[measure]) - float(b[measure])) * _sign(float(a[gap]) - float(b[gap]))
            errors[differing[0]].append(0.5 * (1 - agreement))
    by_axis = {axis: (sum(e) / len(e) if e else None) for axis, e in errors.items()}
    every = [e for values in errors.values() for e in values]
    defined = [v for v in by_axis.values() if v is not None]
    return {"value": sum(every) / len(every) if every else None, "by_axis": by_axis,
            "pairs": {axis: len(e) for axis, e in errors.items()}, "robust": max(defined) if defined else None}
