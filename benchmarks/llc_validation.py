"""The LLC where the answer is known, and what the diagnostics catch: the tables of benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/llc_validation.py

Known coefficients (Watanabe 2009; Aoyagi & Watanabe 2005 for reduced-rank regression):

- linear regression, d = 10, n = 5000, batches of 250, every setting automatic: λ = d/2 = 5;
- y = w²·x at w = 0 (the Hessian vanishes): λ = 1/4; the tempered posterior needs no localization and its
  estimator target is exactly 1/4 at every n;
- y = a·b·x at a = b = 0: λ = 1/2 with multiplicity 2; at finite n and localization γ the target is a
  one-dimensional integral (printed beside), which tends to 1/2 like 1/2 − O(1/log nβ);
- reduced-rank regression y = B·A·x, 3 inputs, 3 outputs, rank 2 (12 weights), true B·A = 0: Aoyagi &
  Watanabe's formula gives λ = [2(H + r)(M + N) − (M − N)² − (H + r)²]/8 = 5/2 (M + N + H + r even:
  multiplicity 1); its finite-n, γ target is not computed here (only the limit).

The singular models' data make L_n(w) = L_n(0) + K(w) exactly (inputs of mean square 1, noise orthogonal to
them) and their chains run on the full batch with the step and localization given (their Hessian at w* is 0).
"""

from __future__ import annotations

import math
import time

import torch  # before hessgap (the C++ extension links against it)
import torch.nn.functional as F
from scipy import integrate
from torch import nn

import hessgap


def regression(n=5000, d=10, batch=250, noise=0.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    y = x @ torch.randn(d, generator=generator) + noise * torch.randn(n, generator=generator)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x.double(), y.double()[:, None]).solution.T.float())
    return model, [(x[i:i + batch], y[i:i + batch, None]) for i in range(0, n, batch)]


def orthogonal_data(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    x = x / x.square().mean().sqrt()
    y = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    return [(x, y - x * (x * y).sum() / (x * x).sum())]


def whitened_data(n, inputs, outputs, seed=0):
    """Inputs with XᵀX/n = I exactly and outputs orthogonal to every input column: L_n(B·A) = L_n(0) + ‖BA‖²/N."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=generator, dtype=torch.float64)
    x = x @ torch.linalg.inv(torch.linalg.cholesky(x.T @ x / n)).T
    y = torch.randn(n, outputs, generator=generator, dtype=torch.float64)
    return [(x, y - x @ torch.linalg.lstsq(x, y).solution)]


class ReducedRank(nn.Module):
    def __init__(self, inputs=3, outputs=3, rank=2):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(rank, inputs, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(outputs, rank, dtype=torch.float64))

    def forward(self, x):
        return x @ self.a.T @ self.b.T


class Scalars(nn.Module):
    """y = w²x (``quartic``) or y = a·b·x (``product``), at 0."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a = nn.Parameter(torch.zeros((), dtype=torch.float64))
        if kind == "product":
            self.b = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        return (self.a ** 2 if self.kind == "quartic" else self.a * self.b) * x


def ab_target(t, gamma):
    def c(a):
        return t * a * a + gamma / 2

    def weight(a):
        return math.exp(-gamma * a * a / 2) / math.sqrt(c(a))

    num = integrate.quad(lambda a: weight(a) * t * a * a / (2 * c(a)), 0, math.inf, limit=500, epsrel=1e-12)[0]
    return num / integrate.quad(weight, 0, math.inf, limit=500, epsrel=1e-12)[0]


def row(label, known, target, result, seconds):
    within = abs(result.value - target) / result.stderr
    flagged = [c["check"] for c in result.diagnostics if not c["ok"]] or ["none"]
    print(f"| {label} | {known} | {target:.4g} | {result.value:.4g} ± {result.stderr:.2g} | {within:.1f} | "
          f"{100 * (result.value / target - 1):+.1f} % | {result.n_beta:.4g}, {result.step_size:.3g}, "
          f"{result.localization:.3g} | {', '.join(flagged)} | {seconds:.1f} |")


def timed(*args, **kwargs):
    started = time.perf_counter()
    result = hessgap.llc(*args, **kwargs)
    return result, time.perf_counter() - started


def main() -> None:
    torch.set_num_threads(1)
    print("| model | λ (known) | target at this n, γ | λ̂ ± SE | |λ̂ − target| / SE | off | nβ, ε, γ | flagged | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    model, data = regression()
    result, seconds = timed(model, data, loss_fn=F.mse_loss)
    row("linear regression d = 10, n = 5000, defaults", "5", 5.0, result, seconds)
    n = 5000
    result, seconds = timed(Scalars("quartic"), orthogonal_data(n), loss_fn=F.mse_loss, step_size=3e-4,
                            localization=0.0, chains=8, draws=2000, burn_in=200)
    row("y = w²x at w = 0, n = 5000", "1/4", 0.25, result, seconds)
    for gamma, step in ((10.0, 2e-3), (1.0, 1e-3)):
        result, seconds = timed(Scalars("product"), orthogonal_data(n), loss_fn=F.mse_loss, step_size=step,
                                localization=gamma, chains=8, draws=4000, burn_in=500)
        row(f"y = abx at a = b = 0, n = 5000, γ = {gamma:g}", "1/2 (m = 2)", ab_target(n / math.log(n), gamma),
            result, seconds)
    for step, note in ((1.5e-4, ""), (5e-4, ", step flagged")):
        result, seconds = timed(ReducedRank(), whitened_data(n, 3, 3), loss_fn=F.mse_loss, step_size=step,
                                localization=1.0, chains=8, draws=6000 if not note else 3000,
                                burn_in=1500 if not note else 1000)
        row(f"reduced-rank regression 3→2→3 at BA = 0, n = 5000, γ = 1{note}", "5/2", 2.5, result, seconds)
    t = n / math.log(n)
    print("\nThe product model's target against γ at n = 5000 (1/2 only as γ/√nβ → 0, slowly: multiplicity 2): "
          + ", ".join(f"γ = {g:g}: {ab_target(t, g):.3f}" for g in (10, 1, 0.1, 1e-2, 1e-4, 1e-8)))

    print("\nWhat the diagnostics catch (linear regression d = 4, n = 1000 unless said):")
    model, data = regression(n=1000, d=4)
    cases = [
        ("step size 5e-3 (auto: 1.5e-4)", model, data, dict(step_size=5e-3, localization=1.0)),
        ("weights moved 0.5 off the least-squares fit", None, data, {}),
        ("step size 1e-7, no burn-in (chains still climbing)", model, [(torch.cat([x for x, _ in data]),
                                                                       torch.cat([y for _, y in data]))],
         dict(step_size=1e-7, localization=0.0, burn_in=0)),
        ("batches of 10 (n = 1000), step 5e-4", model, regression(n=1000, d=4, batch=10)[1],
         dict(step_size=5e-4, localization=1.0)),
    ]
    for label, m, d, settings in cases:
        if m is None:
            m = regression(n=1000, d=4)[0]
            with torch.no_grad():
                m.weight.add_(0.5)
        result, _ = timed(m, d, loss_fn=F.mse_loss, chains=4, **{"draws": 200, "burn_in": 50, **settings})
        flagged = [c for c in result.diagnostics if not c["ok"]]
        print(f"- {label}: λ̂ = {result.value:.3g} ± {result.stderr:.2g}; flagged "
              + ("; ".join(f"{c['check']} ({c['message']})" for c in flagged) if flagged else "nothing")
              + (f"; suggested {result.suggested}" if result.suggested else ""))
    try:
        hessgap.llc(Scalars("quartic"), orthogonal_data(500), loss_fn=F.mse_loss)
    except hessgap.HessgapError as exc:
        print(f"- y = w²x at w = 0 with automatic settings: refused: {exc}")


if __name__ == "__main__":
    main()
