"""Solver time per iteration: hessgap.sharp.lbfgsb.minimize_box against scipy's L-BFGS-B, side by side.

Both solvers minimize a cheap Keskar-style objective over the box |y| ≤ ε(|w| + 1) from y = 0 for 10
iterations with the tolerances off (hessgap's setting), on one thread. The objective, a quartic with
coupled neighbours around a random centre, is the same torch code for both and its time is measured and
taken out, so the figures are the solvers' own work: for scipy, its C code plus the Python driver's
float64 copies and its per-element conversion of the bounds; for hessgap, the tensor code. The paths are
compared too: the largest |x_hessgap − x_scipy| after the run.

Two views of the cost: per iteration of a whole 10-iteration call (what hessgap's sharpness pays), and
per extra iteration, (T(10) − T(1)) / 9, which leaves out each solver's one-time set-up (for scipy, its
per-element conversion of the bounds, seconds at a million variables).

    python benchmarks/lbfgsb_ratio.py                     # n = 1e5 and 1.46e6 (the paper's F1 size)
    python benchmarks/lbfgsb_ratio.py --sizes 1e5 --dtype float32
    python benchmarks/lbfgsb_ratio.py --device cuda       # hessgap on the GPU, scipy on the CPU as always

OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, where set, slow scipy's BLAS: unset both for this command alone
(``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/lbfgsb_ratio.py``).
"""

from __future__ import annotations

import argparse
import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import Bounds, minimize  # noqa: E402

from hessgap.sharp.lbfgsb import minimize_box  # noqa: E402

import _timing  # noqa: E402

CLOCK = _timing.Clock("wall")


class Objective:
    """f(y) = Σ a d⁴ + ½ Σ b d² + ½ Σ (d_{i+1} − d_i)² with d = y − c: a cheap, ill-conditioned stand-in
    for −loss(w + y) (b spread over three decades, neighbours coupled as in a sparse quadratic). Its
    minimizer c lies outside the box for about half of the coordinates, so the searches pass many
    breakpoints and end on many bounds, as Keskar's ascent does."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, eps: float = 0.02, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        weights = torch.randn(n, generator=g, dtype=torch.float64)
        self.radius = (eps * (weights.abs() + 1)).to(device, dtype)
        self.centre = (0.05 * torch.randn(n, generator=g, dtype=torch.float64)).to(device, dtype)
        self.quartic = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(device, dtype)
        self.quadratic = (10 ** (-3 * torch.rand(n, generator=g, dtype=torch.float64))).to(device, dtype)
        self.seconds = 0.0

    def __call__(self, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        started = CLOCK.now()
        d = y - self.centre
        d2 = d * d
        step = d[1:] - d[:-1]
        value = float((self.quartic * d2 * d2 + 0.5 * self.quadratic * d2).sum() + 0.5 * (step * step).sum())
        grad = (4 * self.quartic * d2 + self.quadratic) * d
        grad[:-1] -= step
        grad[1:] += step
        if grad.is_cuda:
            torch.cuda.synchronize()
        self.seconds += CLOCK.now() - started
        return value, grad


def run_scipy(n: int, iterations: int) -> tuple[float, float, np.ndarray, int]:
    """(solver seconds, objective seconds, x, iterations) for scipy, float64 on the CPU."""
    problem = Objective(n, torch.float64, torch.device("cpu"))
    radius = problem.radius.numpy()

    def fun(y: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = problem(torch.from_numpy(y))
        return value, grad.numpy()

    with _timing.stopwatch(CLOCK) as watch:
        result = minimize(
            fun,
            np.zeros(n),
            jac=True,
            method="L-BFGS-B",
            bounds=Bounds(-radius, radius),  # a Bounds object: scipy still converts it element by element
            options={"maxiter": iterations, "gtol": 0.0, "ftol": 0.0},
        )
    total = watch.seconds
    return total - problem.seconds, problem.seconds, result.x, int(result.nit)


def run_hessgap(n: int, iterations: int, dtype: torch.dtype, device: torch.device):
    problem = Objective(n, dtype, device)
    x0 = torch.zeros(n, dtype=dtype, device=device)
    if device.type == "cuda":
        minimize_box(problem, x0, -problem.radius, problem.radius, max_iter=2, gtol=0, ftol=0)  # warm-up
        torch.cuda.synchronize()
        problem.seconds = 0.0
    with _timing.stopwatch(_timing.Clock("wall", device)) as watch:
        result = minimize_box(problem, x0, -problem.radius, problem.radius, max_iter=iterations, gtol=0, ftol=0)
    total = watch.seconds
    return total - problem.seconds, problem.seconds, result.x.double().cpu().numpy(), result.nit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1.46e6], help="problem sizes n")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="hessgap's dtype")
    parser.add_argument("--device", default="cpu", help="hessgap's device")
    args = parser.parse_args(argv)
    _timing.set_threads(1)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)

    rows = []
    for size in args.sizes:
        n = int(size)
        scipy_first, *_ = run_scipy(n, 1)
        scipy_solver, scipy_objective, scipy_x, scipy_nit = run_scipy(n, args.iterations)
        ours_first, *_ = run_hessgap(n, 1, dtype, device)
        ours_solver, ours_objective, ours_x, ours_nit = run_hessgap(n, args.iterations, dtype, device)
        gap = float(np.abs(ours_x - scipy_x).max())
        scipy_per, ours_per = scipy_solver / scipy_nit, ours_solver / ours_nit
        scipy_extra = (scipy_solver - scipy_first) / (scipy_nit - 1)
        ours_extra = (ours_solver - ours_first) / (ours_nit - 1)
        print(
            f"n={n}: scipy {scipy_nit} iterations, solver {scipy_solver:.3f} s (1 iteration: {scipy_first:.3f} s)"
            f" + objective {scipy_objective:.3f} s; hessgap ({args.dtype}, {device}) {ours_nit} iterations, solver"
            f" {ours_solver:.3f} s (1 iteration: {ours_first:.3f} s) + objective {ours_objective:.3f} s;"
            f" max |Δx| {gap:.2e}"
        )
        rows.append((n, scipy_per, ours_per, gap, scipy_first - scipy_extra, scipy_extra, ours_extra))

    print(f"\none thread, {args.iterations} iterations, hessgap in {args.dtype} on {device}; solver time only\n")
    print(
        "| n | scipy s/iter | hessgap s/iter | ratio | max \\|x_hessgap − x_scipy\\| | scipy set-up s |"
        " scipy s/extra iter | hessgap s/extra iter | ratio per extra iter |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, scipy_per, ours_per, gap, setup, scipy_extra, ours_extra in rows:
        print(
            f"| {n:,} | {scipy_per:.4f} | {ours_per:.4f} | {ours_per / scipy_per:.3f} | {gap:.1e} | {setup:.2f} |"
            f" {scipy_extra:.4f} | {ours_extra:.4f} | {ours_extra / scipy_extra:.2f} |"
        )


if __name__ == "__main__":
    main()
