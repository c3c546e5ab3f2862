"""Diagnostics of an LLC run (:mod:`hessgap.measures.llc`): which estimates to distrust, and what to run
instead. Every check returns ``{"check", "ok", "value", "message"}``; the failed ones add to ``suggested``.

- ``diverged``: a chain's loss or gradient stopped being finite (the step size is far too large).
- ``below_minimum``: a chain's loss after burn-in lies below L_n(w*) on average: w* is not a local minimum
  (the chain found lower loss: train further), or the localization is too weak to hold the chain near it.
- ``settled``: the traces after burn-in still drift: the split-R̂ of Gelman et al. (2013) over the chains'
  halves is above 1.1, or a chain's second half differs from its first by more than 3 standard errors and
  10 % of the estimate (more burn-in and draws).
- ``step_size``: q = ε·(nβ·λmax + γ)/4, λmax the Hessian's top eigenvalue at w* and at the end of chain 0
  (the larger; at a singular w* the curvature where the chain went can be far larger). For a quadratic loss
  the sharpest direction's variance is 1/(1 − q) times the exact one and the chain is unstable for q ≥ 1;
  flagged above q = 0.1 (variance 11 % too large), suggesting the step with q = 0.02.
- ``minibatch_noise``: the minibatch gradient's own noise adds variance the posterior does not have; for
  a quadratic loss with γ ≪ nβλ it raises λ̂ by at most ε·(nβ)²·tr(C)/8, C the covariance of a minibatch's
  gradient at w* (from the batches' gradients; 0 when every step takes all the data). Flagged above 10 % of the estimate, suggesting the step
  size that makes it 5 % (or larger batches).
"""

from __future__ import annotations

import math

import torch

from .._state import preserved
from ..curvature.operator import HessianOperator
from ..spectrum.lanczos import eigenvalues

MAX_RHAT = 1.1
MAX_STEP_FRACTION = 0.1
SUGGESTED_STEP_FRACTION = 0.02
MAX_NOISE_SHARE = 0.1


def _check(name: str, ok: bool, value, message: str) -> dict:
    return {"check": name, "ok": bool(ok), "value": value, "message": message}


def split_rhat(traces: torch.Tensor) -> float | None:
    """Split-R̂ (Gelman et al. 2013, BDA3 §11.4) of (chains, draws) traces: each chain cut in two halves,
    between-half variance against within-half variance; None with fewer than 4 draws."""
    draws = traces.shape[1] // 2
    if draws < 2:
        return None
    halves = torch.cat([traces[:, :draws], traces[:, draws:2 * draws]])
    means = halves.mean(1)
    within = halves.var(1).mean()
    between = draws * means.var()
    if float(within) <= 0:
        return None
    pooled = (draws - 1) / draws * within + between / draws
    return float(torch.sqrt(pooled / within))


def _settled(result, after: torch.Tensor) -> tuple[dict, dict]:
    rhat = split_rhat(after) if after.shape[0] >= 1 else None
    half = after.shape[1] // 2
    drift, worst = None, 0.0
    if half >= 2:
        first, second = after[:, :half].mean(1), after[:, half:2 * half].mean(1)
        change = second - first
        if len(change) >= 2:
            drift = float(change.mean())
            spread = float(change.std()) / math.sqrt(len(change))
            worst = abs(drift) / spread if spread > 0 else 0.0
    scale = max(abs(result.value), 1e-12)
    drifting = drift is not None and worst > 3 and abs(drift) > 0.1 * scale
    ok = not drifting and (rhat is None or rhat <= MAX_RHAT)
    text = (f"split-R̂ {rhat:.3f}" if rhat is not None else "split-R̂ n/a") + (
        f", second half minus first {drift:+.3g} ({worst:.1f} standard errors)" if drift is not None else "")
    suggestion = {} if ok else {"burn_in": result.burn_in + result.draws // 2, "draws": 2 * result.draws}
    message = text + ("" if ok else ": the traces have not settled; burn in longer and draw more")
    return _check("settled", ok, rhat, message), suggestion


def _lmax_at(ctx, final: dict, chain: int) -> float | None:
    """λmax of the Hessian at chain ``chain``'s last position (the model's weights put back afterwards)."""
    with preserved(ctx.model, train_mode=False):
        params = dict(ctx.model.named_parameters())
        with torch.no_grad():
            for name, stacked in final.items():
                params[name].copy_(stacked[chain])
        operator = HessianOperator(ctx.model, ctx.batches, loss_fn=ctx.loss_fn)
        return float(eigenvalues(operator, k=1, tol=1e-2, seed=ctx.seed).eigenvalues[0])


def _gradient_spread(ctx) -> float:
    """tr(C): the variance of one step's minibatch gradient around the full gradient at w*, Σ_j w_j‖g_j − ḡ‖²/W
    over the steps' minibatches j. On several ranks with as many batches each, minibatch j is the union of
    every rank's batch j, as in the chains (one all-reduce per batch); with unequal counts, each rank's
    batches are taken alone and the variance divided by the number of ranks (a step averages one batch of
    each)."""
    objective, ranks = ctx.objective(), ctx.ranks
    batches = list(objective.batches())
    unions = len(set(ranks.gather_object(len(batches)))) == 1
    total, squares, weight = None, 0.0, 0.0
    with preserved(ctx.model, train_mode=False, parameters=False):
        for batch in batches:
            grads = torch.autograd.grad(objective.batch_loss(batch), objective.params, allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                              for g, p in zip(grads, objective.params)])
            w = float(batch.weight)
            if unions and ranks.active:
                bucket = [flat * w, torch.tensor([w], dtype=torch.float64, device=flat.device)]
                ranks.sum_bucket_(bucket)
                w = float(bucket[1])
                flat = bucket[0] / w
            total = flat * w if total is None else total.add_(flat, alpha=w)
            squares += float(flat.square().sum()) * w
            weight += w
    if not unions:
        summed = [total, torch.tensor([squares, weight], dtype=torch.float64, device=total.device)]
        ranks.sum_bucket_(summed)
        total, (squares, weight) = summed[0], summed[1].tolist()
    spread = max(squares / weight - float((total / weight).square().sum()), 0.0)
    return spread if unions else spread / ranks.world_size


def diagnose(ctx, result, run) -> tuple[list[dict], dict]:
    """Every check of the module docstring on a finished run; the checks and the suggested settings."""
    checks, suggested = [], {}
    diverged = [c for c, step in enumerate(run.diverged) if step is not None]
    checks.append(_check("diverged", not diverged, len(diverged),
                         "no chain diverged" if not diverged else
                         f"chain(s) {diverged} diverged (at step(s) {[run.diverged[c] for c in diverged]})"))
    traces = torch.tensor(result.traces, dtype=torch.float64)
    after = traces[:, result.burn_in:]
    after = after[torch.isfinite(after).all(1)]
    below = [c for c, v in enumerate(result.per_chain) if math.isfinite(v) and v < 0]
    checks.append(_check(
        "below_minimum", not below, len(below),
        "every chain's loss stayed above L_n(w*)" if not below else
        f"chain(s) {below} fell below L_n(w*) (their estimates {[round(result.per_chain[c], 3) for c in below]}): "
        "w* is not a local minimum of the training loss (train further) or the localization is too weak"))
    if below:
        suggested["localization"] = max(10 * result.localization, 1e-12)
    if after.shape[0] and after.shape[1] >= 4:
        check, more = _settled(result, after)
        checks.append(check)
        suggested.update(more)
    lmax = result.lmax
    ends = [c for c in range(result.chains) if run.diverged[c] is None]
    end_lmax = _lmax_at(ctx, run.final, ends[0]) if ends else None
    curvature = max(v for v in (lmax, end_lmax, 0.0) if v is not None)
    q = result.step_size * (result.n_beta * curvature + result.localization) / 4
    where = f"λmax {lmax:.4g} at w*" if lmax is not None else "λmax at w* not computed"
    where += f", {end_lmax:.4g} at chain {ends[0]}'s end" if end_lmax is not None else ""
    step_ok = q <= MAX_STEP_FRACTION and not diverged
    checks.append(_check(
        "step_size", step_ok, q,
        f"ε·(nβλmax + γ)/4 = {q:.3g} ({where})" + ("" if step_ok else (
            ": beyond the stability bound ε < 4/(nβλmax + γ)" if q >= 1 else
            f": the sharpest direction's variance is inflated by {100 * q / (1 - q):.0f} %"))))
    if not step_ok and curvature > 0:
        suggested["step_size"] = 4 * SUGGESTED_STEP_FRACTION / (result.n_beta * curvature + result.localization)
    elif diverged:
        suggested["step_size"] = result.step_size / 10
    spread = _gradient_spread(ctx)
    bound = result.step_size * result.n_beta ** 2 * spread / 8
    scale = abs(result.value) if math.isfinite(result.value) else 0.0
    noise_ok = bound <= MAX_NOISE_SHARE * max(scale, 1e-12)
    checks.append(_check(
        "minibatch_noise", noise_ok, bound,
        f"minibatch gradient noise adds at most {bound:.3g} to λ̂" + ("" if noise_ok else (
            f" ({100 * bound / max(scale, 1e-12):.0f} % of it): use larger batches or a smaller step size"))))
    if not noise_ok and bound > 0:
        smaller = result.step_size * 0.5 * MAX_NOISE_SHARE * scale / bound
        suggested["step_size"] = min(suggested.get("step_size", math.inf), smaller)
    return checks, suggested


def plot_traces(result: dict, path, title: str | None = None):
    """The traces nβ·(L_m(w_t) − L_m(w*)) of a result dict (:class:`~hessgap.measures.llc.LLCResult`), one
    line per chain (a running mean over 10 steps drawn over the raw trace), burn-in shaded, the estimate ±
    its standard error; written as a PNG, atomically. Returns the path."""
    from matplotlib.figure import Figure

    from .._io import save_figure

    figure = Figure(figsize=(7.0, 4.0))
    axes = figure.add_subplot(1, 1, 1)
    traces = torch.tensor(result["traces"], dtype=torch.float64)
    steps = torch.arange(traces.shape[1]).tolist()
    for c, row in enumerate(traces):
        axes.plot(steps, row.tolist(), color=f"C{c % 10}", alpha=0.25, linewidth=0.6)
        window = min(10, len(row))
        smooth = torch.nn.functional.avg_pool1d(row.reshape(1, 1, -1), window, stride=1).flatten()
        axes.plot(steps[window - 1:], smooth.tolist(), color=f"C{c % 10}", linewidth=1.2, label=f"chain {c}")
    axes.axvspan(0, result["burn_in"], color="grey", alpha=0.15, label="burn-in")
    value, stderr = result["value"], result.get("stderr")
    axes.axhline(value, color="black", linewidth=1.0, label=f"λ̂ = {value:.3g}" + (f" ± {stderr:.2g}" if stderr else ""))
    if stderr:
        axes.axhspan(value - stderr, value + stderr, color="black", alpha=0.1)
    axes.axhline(0.0, color="black", linewidth=0.5, linestyle=":")
    axes.set_xlabel("SGLD step")
    axes.set_ylabel("nβ · (L_m(w_t) − L_m(w*))")
    flagged = [c["check"] for c in result.get("diagnostics", []) if not c["ok"]]
    axes.set_title(title or (f"LLC traces (nβ = {result['n_beta']:.3g}, ε = {result['step_size']:.2g}, "
                             f"γ = {result['localization']:.2g})" + (f"; flagged: {', '.join(flagged)}" if flagged
                                                                       else "")), fontsize=9)
    axes.legend(fontsize=7, loc="upper right", ncol=2)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path, dpi=110)
