"""The local learning coefficient (LLC) of singular learning theory at the model's weights w*:

    λ̂ = nβ · (E_w[L_n(w)] − L_n(w*)),   w ~ exp(−nβ·L_n(w) − (γ/2)‖w − w*‖²),   β = 1/log n

(Lau, Furman, Wang, Murfet, Wei 2023, "Quantifying degeneracy in singular models via the learning
coefficient"; Watanabe 2013, WBIC, for β = 1/log n). For a regular model with d parameters λ = d/2; a
degenerate or singular minimum has a smaller λ (the model is "simpler" there).

The expectation is a mean over SGLD chains (:mod:`.sgld`) started at w*, after ``burn_in`` steps, of
L_m(w_t) − L_m(w*): each step's minibatch loss minus the same minibatch's loss at w*, weighted by the
minibatch's units. Its expectation is that of devinterp's L_m(w_t) − L_n(w*), and over whole passes over
the batches the two agree; otherwise the minibatches' own sampling noise (nβ times it is hundreds of times λ
for n in the thousands) stays in devinterp's form, the same in every chain (they see the same batches) and
so invisible in the spread over chains, while here it cancels. The error bar is the standard error of the
mean over the chains.

Where hessgap differs from devinterp 2.0 (``devinterp.slt.llc``): draws before ``burn_in`` are left out
(devinterp averages every step); L_n(w*) is the loss over all the data, not 32 batches; the model is in
eval mode (devinterp samples in train mode: dropout on); batches are weighted by their units (tokens
that count); devinterp's ``llc_std`` is the standard deviation over chains, hessgap's ``stderr`` that
divided by √chains.

Defaults that need no tuning (``"auto"``), from the Hessian's top eigenvalue λmax at w* (Lanczos) and nβ:

- nβ = n / log n, n the units over every rank's data (Watanabe's β = 1/log n);
- localization γ = 1e-3 · nβ · λmax: it shrinks the contribution of a direction of curvature h by the
  factor nβh / (nβh + γ), so below 1 % for directions within a tenth of the sharpest;
- step size ε = 4·0.02 / (nβ·λmax + γ): in the sharpest direction the chain contracts by 4 % a step and
  its variance is inflated by 1/(1 − 0.02) (the discretization bias), far inside the stability bound
  ε < 4 / (nβ·λmax + γ).

At a singular point where the Hessian vanishes (λmax ≈ 0) "auto" cannot set a scale and says so; pass
``step_size`` and ``localization``. The diagnostics (:mod:`.llc_checks`) flag a run to distrust and
suggest settings.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .. import _checks
from .._results import JsonResult
from .._state import preserved
from ..errors import HessgapError
from . import hessian, llc_checks
from .context import Context, NotApplicable, Outcome
from .sgld import run_chains

DEFAULT_CHAINS = 4
DEFAULT_DRAWS = 200
DEFAULT_BURN_IN = 100
#: ε·(nβλmax + γ)/4 of the automatic step: the sharpest direction's variance is inflated by 1/(1 − it).
STEP_FRACTION = 0.02
#: γ / (nβλmax) of the automatic localization.
LOCALIZATION_FRACTION = 1e-3


@dataclass(repr=False)
class LLCResult(JsonResult):
    """The LLC estimate (``value`` ± ``stderr``, the standard error over chains), each chain's estimate, the
    settings it ran with, the traces and the diagnostics.

    ``traces[c][t]`` is nβ·(L_m(w_t) − L_m(w*)) of chain c at step t (its mean after ``burn_in``, weighted
    by ``step_units``, the units of each step's minibatch, is the chain's estimate), ``loss_traces`` the
    minibatch losses L_m(w_t) themselves; ``diagnostics`` lists
    every check (``ok``, ``message``), ``trustworthy`` is whether all passed and ``suggested`` the settings
    to try instead. ``plot(path)`` draws the traces as a PNG.
    """

    value: float
    stderr: float | None
    per_chain: list
    n_beta: float
    step_size: float
    localization: float
    chains: int
    draws: int
    burn_in: int
    loss: float
    units: float
    lmax: float | None
    traces: list
    loss_traces: list
    step_units: list
    diverged: list
    diagnostics: list
    trustworthy: bool
    suggested: dict
    devinterp_style: float | None = None
    path: str = ""
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        err = f" ± {self.stderr:.3g}" if self.stderr is not None else ""
        lines = [f"LLC {self.value:.4g}{err} ({self.chains} chains × {self.draws} draws after {self.burn_in} burn-in, "
                 f"nβ = {self.n_beta:.4g}, ε = {self.step_size:.3g}, γ = {self.localization:.3g})"]
        for check in self.diagnostics:
            lines.append(f"  {'ok  ' if check['ok'] else 'FLAG'} {check['check']}: {check['message']}")
        if self.suggested:
            lines.append("  suggested: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in self.suggested.items()))
        return "\n".join(lines)

    def plot(self, path, title: str | None = None):
        """The chains' traces nβ·(L_m(w_t) − L_m(w*)) against the step, burn-in shaded, the estimate ± its
        standard error; written as a PNG to ``path`` (returned)."""
        return llc_checks.plot_traces(self.to_dict(), path, title)


def _setting(value, name: str, what: str, *, zero_ok: bool = False) -> float | str:
    if value == "auto":
        return value
    if zero_ok:
        return _checks.nonnegative_number(value, name, what + ' (or "auto")')
    return _checks.positive_number(value, name, what + ' (or "auto")')


def _scales(ctx: Context, n_beta, step_size, localization, need_lmax: bool) -> tuple:
    """nβ, ε, γ, λmax(w*) and the units n of the data (every rank's), the "auto" ones set as the module
    docstring says."""
    _, units = ctx.objective().totals()
    if n_beta == "auto":
        if units < 3:
            raise NotApplicable(f"nβ = n/log n needs n ≥ 3 units, the data hold {units:g}; pass n_beta=")
        n_beta = units / math.log(units)
    lmax = hessian.hessian_lmax(ctx).value if need_lmax else None
    if step_size == "auto" or localization == "auto":
        # a curvature within 1000 roundings of the loss is no curvature: the Hessian vanishes at w*
        with preserved(ctx.model, train_mode=False, parameters=False):
            floor = 1e3 * torch.finfo(ctx.dtype).eps * max(abs(ctx.objective().value()), 1e-30)
        if not (lmax is not None and math.isfinite(lmax) and lmax > floor):
            raise NotApplicable(
                f"the Hessian's top eigenvalue at w* is {lmax:.3g}: no curvature sets the scale of the automatic "
                "step size and localization (a singular point, or not a minimum); pass step_size= and localization="
            )
    if localization == "auto":
        localization = LOCALIZATION_FRACTION * n_beta * lmax
    if step_size == "auto":
        step_size = 4 * STEP_FRACTION / (n_beta * lmax + localization)
    return float(n_beta), float(step_size), float(localization), lmax, float(units)


def _estimates(chains, n_beta: float, burn_in: int, loss0: float) -> tuple[list, list]:
    """Per chain: the estimate from the draws after burn-in (weighted by units) and devinterp's form
    nβ·(mean L_m(w_t) − L_n(w*)); NaN for a chain that diverged."""
    after = slice(burn_in, None)
    w = chains.weights[after]
    excess = (chains.losses - chains.reference)[:, after]
    ours = (n_beta * (excess * w).sum(1) / w.sum()).tolist()
    plain = (n_beta * (chains.losses[:, after].mean(1) - loss0)).tolist()
    return ours, plain


def _mean_and_stderr(values: list) -> tuple[float, float | None]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, None
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return mean, math.sqrt(var / len(finite))


def llc_measure(ctx: Context, step_size="auto", localization="auto", n_beta="auto", chains: int = DEFAULT_CHAINS,
                draws: int = DEFAULT_DRAWS, burn_in: int = DEFAULT_BURN_IN, vectorize: bool = True,
                diagnose: bool = True) -> Outcome:
    """The LLC at the model's weights (see the module docstring), with its standard error over chains; the
    whole :class:`LLCResult` is the outcome's ``details``."""
    started = time.perf_counter()
    step_size = _setting(step_size, "step_size", "the SGLD step ε")
    localization = _setting(localization, "localization", "the pull γ towards w*", zero_ok=True)
    n_beta = _setting(n_beta, "n_beta", "the inverse temperature times the units, nβ")
    chains = _checks.positive_int(chains, "chains", "the number of SGLD chains")
    draws = _checks.positive_int(draws, "draws", "the steps averaged per chain after burn-in")
    burn_in = _checks.nonnegative_int(burn_in, "burn_in", "the steps left out at the start of each chain")
    _checks.flag(vectorize, "vectorize")
    _checks.flag(diagnose, "diagnose")
    notes = []
    if ctx.half_precision:
        notes.append(f"sampled on a float32 copy of the {str(ctx.dtype).replace('torch.', '')} model (the same "
                     "weights): steps of √ε ≈ 1e-3 of a weight round away in half precision")
        ctx = ctx.in_float32()
    need_lmax = diagnose or "auto" in (step_size, localization)
    n_beta, step_size, localization, lmax, units = _scales(ctx, n_beta, step_size, localization, need_lmax)
    objective = ctx.objective()
    with preserved(ctx.model, train_mode=False):
        loss0 = objective.value()
        progress = None
        if ctx.progress:
            from tqdm.auto import tqdm

            def progress(steps):
                return tqdm(steps, desc="SGLD", leave=False)
        run = run_chains(objective, step_size=step_size, n_beta=n_beta, localization=localization, chains=chains,
                         steps=burn_in + draws, seed=ctx.seed, vectorize=vectorize, progress=progress)
    per_chain, plain = _estimates(run, n_beta, burn_in, loss0)
    value, stderr = _mean_and_stderr(per_chain)
    excess = n_beta * (run.losses - run.reference)
    result = LLCResult(
        value=value, stderr=stderr, per_chain=per_chain, n_beta=n_beta, step_size=step_size,
        localization=localization, chains=chains, draws=draws, burn_in=burn_in, loss=loss0,
        units=units, lmax=lmax,
        traces=[[round(v, 6) for v in row] for row in excess.tolist()],
        loss_traces=[[round(v, 8) for v in row] for row in run.losses.tolist()], step_units=run.weights.tolist(),
        diverged=run.diverged,
        diagnostics=[], trustworthy=True, suggested={}, devinterp_style=_mean_and_stderr(plain)[0],
        path=run.path, notes=notes + run.notes)
    if diagnose:
        result.diagnostics, result.suggested = llc_checks.diagnose(ctx, result, run)
        result.trustworthy = all(check["ok"] for check in result.diagnostics)
    result.seconds = time.perf_counter() - started
    if not math.isfinite(value):
        raise NotApplicable("every chain diverged (its loss or gradient stopped being finite): "
                            f"the step size ε = {step_size:.3g} is too large; "
                            + (f"try step_size={result.suggested['step_size']:.3g}"
                               if "step_size" in result.suggested else "try a smaller step_size"))
    flagged = [check["message"] for check in result.diagnostics if not check["ok"]]
    return Outcome(value, stderr, details=result.to_dict(), notes=result.notes + flagged)


def llc(model, data, *, loss_fn=None, seed: int = 0, max_batches: int | None = None, progress: bool = False,
        **settings) -> LLCResult:
    """The local learning coefficient of ``model`` at its current weights over ``data`` (any loader or
    iterable of batches, as :func:`hessgap.measures`): SGLD chains around the weights, the estimate with its
    standard error over chains, the traces (``.plot(path)``) and diagnostics that flag a run to distrust.

    ``settings``: ``step_size``, ``localization``, ``n_beta`` (each a number or ``"auto"``), ``chains``,
    ``draws``, ``burn_in``, ``vectorize`` (batch the chains with vmap where the model allows),
    ``diagnose``. The model comes back exactly as it was. Raises :class:`HessgapError` when the LLC
    cannot be taken (every chain diverged; "auto" at a point without curvature), saying what to pass.
    """
    from .api import measures

    result = measures(model, data, ["llc"], loss_fn=loss_fn, options={"llc": settings}, seed=seed,
                      max_batches=max_batches, check_invariance=False, progress=progress)
    if result.values["llc"] is None:
        raise HessgapError(result.not_applicable["llc"].replace("llc does not apply: ", "the LLC cannot be taken: "))
    return LLCResult(**result.details["llc"])

