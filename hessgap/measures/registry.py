"""Every measure hessgap.measures takes, one entry each: its name, function, default settings, family, the
literature's reference and what the literature says of its reparametrization behaviour (``declared``; the
answer :func:`hessgap.measures` reports is the one it *checks* on the model).

Adding a measure is a matter of its function (``fn(ctx, **settings) -> Outcome``, see
:mod:`hessgap.measures.context`) and its entry here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from .. import _checks
from ..errors import HessgapError
from ..names import DEFAULT_MEASURE_NAMES, MEASURE_NAMES
from . import average_case, fisher_rao, geodesic, hessian, llc, pacbayes, relative_flatness, worst_case


@dataclass(frozen=True)
class Measure:
    """One measure: ``fn(ctx, **settings)``; ``declared`` is True when the literature shows it unchanged by
    the ReLU/BatchNorm rescalings, False when it is not, None when it depends on details (solver, ε)."""

    name: str
    fn: Callable
    family: str
    reference: str
    declared: bool | None
    description: str
    cost: int  # rough relative cost, for ordering and for the quick presets
    by_default: bool = True  # taken when no names are given; False: on request only (names=[...])

    @property
    def defaults(self) -> dict:
        """The keyword settings of ``fn`` and their defaults."""
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return {p.name: p.default for p in params}

    def settings(self, overrides: dict | None = None) -> dict:
        """The defaults with ``overrides`` applied; an unknown setting names the known ones."""
        merged = self.defaults
        for key, value in (overrides or {}).items():
            if key not in merged:
                raise HessgapError(f"measure {self.name!r} has no setting {key!r}; its settings are "
                                   f"{', '.join(merged) or 'none'}")
            merged[key] = value
        return merged


KESKAR = "Keskar et al. 2017, Metric 2.1"
ANDRIUSHCHENKO = "Andriushchenko et al. 2023, A modern look at the relationship between sharpness and generalization"
JIANG = "Jiang et al. 2020, Fantastic generalization measures, App. C.3"

MEASURES: dict[str, Measure] = {m.name: m for m in (
    Measure("keskar", worst_case.keskar, "worst-case", KESKAR, False,
            "max relative loss rise (%) in the box |y_i| ≤ ε(|x_i| + 1), full space", 3),
    Measure("keskar_subspace", worst_case.keskar_subspace, "worst-case", KESKAR, False,
            "the same in a random 100-dimensional subspace", 3),
    Measure("adaptive_linf", worst_case.adaptive_linf, "worst-case", ANDRIUSHCHENKO, True,
            "max loss rise for |δ_i| ≤ ρ|x_i|", 3),
    Measure("adaptive_l2", worst_case.adaptive_l2, "worst-case", ANDRIUSHCHENKO, True,
            "max loss rise for ‖δ/|x|‖₂ ≤ ρ", 3),
    Measure("m_sharpness", worst_case.m_sharpness, "worst-case",
            "Foret et al. 2021; Andriushchenko & Flammarion 2022", True,
            "mean over batches of m samples of each batch's adaptive ℓ∞ worst-case rise", 4),
    Measure("gaussian", average_case.plain, "average-case", ANDRIUSHCHENKO, False,
            "E f(x + δ) − f(x), δ ~ N(0, ρ²)", 1),
    Measure("gaussian_adaptive", average_case.adaptive, "average-case", ANDRIUSHCHENKO, True,
            "E f(x + δ) − f(x), δ ~ N(0, ρ² x²)", 1),
    Measure("pacbayes_flatness", pacbayes.flatness, "PAC-Bayes", JIANG + " (53)", False,
            "1/σ², σ: isotropic noise that lowers the training accuracy by 0.1", 5),
    Measure("pacbayes_mag_flatness", pacbayes.magnitude_flatness, "PAC-Bayes", JIANG + " (61)", None,
            "1/σ′², noise variance σ′²x² + 1e-6 that lowers the training accuracy by 0.1", 5),
    Measure("hessian_lmax", hessian.hessian_lmax, "Hessian", "Keskar et al. 2017 (sharp: large eigenvalues); Dinh et al. 2017", False,
            "largest eigenvalue of the loss's Hessian H", 2),
    Measure("hessian_trace", hessian.hessian_trace, "Hessian", "Dinh et al. 2017", False,
            "trace of H (Hutchinson)", 1),
    Measure("scaled_lmax", hessian.scaled_lmax, "Hessian", KESKAR + " coordinates", False,
            "largest eigenvalue of D·H·D, D = diag(|x| + 1)", 2),
    Measure("scaled_trace", hessian.scaled_trace, "Hessian", KESKAR + " coordinates", False,
            "trace of D·H·D", 1),
    Measure("scaled_lmax_over_trace", hessian.scaled_lmax_over_trace, "Hessian", KESKAR + " coordinates", False,
            "λmax(DHD) / tr(DHD)", 1),
    Measure("relative_flatness", relative_flatness.relative_flatness, "Hessian",
            "Petzka et al. 2021, Relative flatness and generalization, Def. 3", True,
            "Σ_ss' ⟨w_s, w_s'⟩ Tr(H_ss') over the last linear layer (or layer=)", 1),
    Measure("fisher_rao", fisher_rao.fisher_rao, "norm", "Liang et al. 2019, Def. 2.1", True,
            "‖θ‖²_fr = E⟨θ, ∇_θ ℓ⟩²", 1),
    Measure("llc", llc.llc_measure, "singular learning theory",
            "Lau et al. 2023, Quantifying degeneracy in singular models via the learning coefficient", True,
            "local learning coefficient nβ(E_w L_n(w) − L_n(w*)), SGLD around w*, β = 1/log n", 6, by_default=False),
    Measure("geodesic", geodesic.geodesic_sharpness, "worst-case",
            "da Silva, Dangel & Oore 2025, Hide & Seek: transformer symmetries obscure sharpness", True,
            "max loss rise over a geodesic ball of the quotient by attention's GL(h) and the scale symmetries", 3,
            by_default=False),
)}

NAMES: tuple[str, ...] = tuple(MEASURES)
#: The measures taken when ``names`` is None (the others, costly or model-specific, run when named).
DEFAULT_NAMES: tuple[str, ...] = tuple(m.name for m in MEASURES.values() if m.by_default)
assert NAMES == MEASURE_NAMES, "hessgap.names.MEASURE_NAMES must list the registry's measures, in its order"
assert DEFAULT_NAMES == DEFAULT_MEASURE_NAMES, "hessgap.names.DEFAULT_MEASURE_NAMES must match the registry"


def resolve(names) -> list[Measure]:
    """The entries of ``names`` (None: every measure taken by default, in registry order; a string: one, or
    comma-separated; or a list or tuple of names); anything else, and unknown names, raise, listing the known
    ones."""
    if names is None:
        return [m for m in MEASURES.values() if m.by_default]
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise HessgapError(f"names must be None (every measure), a measure name, a comma-separated string or a list "
                           f"of names, got {names!r}; the measures are {', '.join(NAMES)}")
    if not names:
        raise HessgapError(f"no measure named; choose from {', '.join(NAMES)} (or names=None for all)")
    for name in names:
        _checks.choice(name, NAMES, "measure")
    return [MEASURES[name] for name in dict.fromkeys(names)]
