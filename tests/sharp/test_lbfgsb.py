"""hessgap.sharp.lbfgsb.minimize_box against scipy's L-BFGS-B, the independent reference.

Each case runs both solvers from the same start and compares every iterate (recorded through the
callbacks), its value and the evaluation count so far. Both compute in float64 but not bit for bit alike
(sums in other orders), and L-BFGS-B's path is discontinuous at one place: when a line search ends at the
box's edge, the variable that limits the step lands on its bound or one ulp inside, and that decides the
next step's limit. scipy itself, given the objective scaled by (1 + 2⁻⁵²), parts ways there. A path may
therefore part from scipy's only right after iterates that agree and sit on opposite sides of that
one-ulp split (``_ulp_bound_split``); any other difference fails.
"""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import Bounds, minimize

from hessgap.errors import HessgapError, NonFiniteError
from hessgap.sharp import _cauchy
from hessgap.sharp.lbfgsb import (
    ABNORMAL,
    CONVERGED_GRADIENT,
    STOPPED_CALLBACK,
    STOPPED_EVALUATIONS,
    STOPPED_ITERATIONS,
    minimize_box,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
PATH_TOLERANCE = 1e-8  # max |x_ours − x_scipy| / max(1, max |x_scipy|) per iterate


# ------------------------------------------------------------------------------------------------ problems


def quadratic(n, seed, condition=100.0):
    """½xᵀHx − bᵀx with H's eigenvalues spread over `condition`; a third of the unconstrained minimizer's
    coordinates lie outside the box, so those variables end on bounds."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    h = q @ torch.diag(torch.logspace(0, math.log10(condition), n, dtype=F64)) @ q.T
    minimizer = 2 * torch.randn(n, generator=g, dtype=F64)
    b = h @ minimizer
    width = torch.rand(n, generator=g, dtype=F64) + 0.5
    k = n // 3
    centre = minimizer + (torch.rand(n, generator=g, dtype=F64) - 0.5) * width
    centre[:k] = minimizer[:k] - torch.sign(torch.randn(k, generator=g, dtype=F64)) * (width[:k] + 0.5)
    lower, upper = centre - width, centre + width
    x0 = lower + torch.rand(n, generator=g, dtype=F64) * (upper - lower)
    return (lambda x: (float(0.5 * x @ h @ x - b @ x), h @ x - b)), x0, lower, upper


def rosenbrock(n):
    def fun(x):
        x = x.detach().requires_grad_(True)
        value = (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()
        value.backward()
        return value.item(), x.grad

    upper = torch.full((n,), 0.5, dtype=F64)
    upper[::3] = 2.0
    return fun, torch.full((n,), -1.2, dtype=F64), torch.full((n,), -2.0, dtype=F64), upper


def mlp_sharpness(seed, eps, dtype=F64):
    """−loss(x + y) of a small tanh network near a minimum x, over Keskar et al.'s box |y| ≤ ε(|x| + 1)."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(64, 5, generator=g, dtype=F64)
    labels = (inputs[:, 0] * inputs[:, 1] > 0).long()
    shapes = [(8, 5), (8,), (2, 8), (2,)]
    sizes = [math.prod(s) for s in shapes]

    def loss(flat):
        w1, b1, w2, b2 = (p.view(s) for p, s in zip(torch.split(flat, sizes), shapes))
        logits = torch.tanh(inputs.to(flat.dtype) @ w1.T + b1) @ w2.T + b2
        return torch.nn.functional.cross_entropy(logits, labels)

    w = (0.5 * torch.randn(sum(sizes), generator=g, dtype=F64)).requires_grad_(True)
    optimizer = torch.optim.SGD([w], lr=0.5)
    for _ in range(200):
        optimizer.zero_grad()
        loss(w).backward()
        optimizer.step()
    x = w.detach().to(dtype)
    radius = eps * (x.abs() + 1)

    def negative_loss(y):
        y = y.detach().requires_grad_(True)
        value = -loss(x + y)
        value.backward()
        return value.item(), y.grad

    return negative_loss, torch.zeros_like(x), -radius, radius


def separable(n=12):
    centre = torch.linspace(-3, 3, n, dtype=F64)
    return lambda x: (float(((x - centre) ** 2).sum() + 0.1 * (x**4).sum()), 2 * (x - centre) + 0.4 * x**3)


def linear(n=12):
    """A linear f: the minimizer is the box's corner, so every variable ends on a bound."""
    slope = torch.linspace(1, 2, n, dtype=F64) * torch.tensor([1.0, -1.0], dtype=F64).repeat(n // 2)
    return lambda x: (float(slope @ x), slope.clone()), slope


def unit_box(n=12, scale=1.0):
    return -scale * torch.ones(n, dtype=F64), scale * torch.ones(n, dtype=F64)


# ---------------------------------------------------------------------------------------------- comparison


def _inside(fun, lower, upper, dtype=F64):
    """fun, asserting that every point it is asked about lies in the box and has the caller's dtype."""

    def checked(x):
        assert x.dtype == dtype
        assert bool(((x >= lower) & (x <= upper)).all()), "evaluated a point outside the box"
        return fun(x)

    return checked


def scipy_path(fun, x0, lower, upper, max_iter, memory=10, gtol=0.0, ftol=0.0, maxls=20, maxfun=15000):
    xs, values, counts, calls = [], [], [], [0]

    def numpy_fun(x):
        calls[0] += 1
        value, grad = fun(torch.from_numpy(x.copy()))
        return float(value), grad.numpy()

    def callback(intermediate_result):
        xs.append(intermediate_result.x.copy())
        values.append(float(intermediate_result.fun))
        counts.append(calls[0])

    options = dict(maxiter=max_iter, maxcor=memory, gtol=gtol, ftol=ftol, maxls=maxls, maxfun=maxfun)
    bounds = Bounds(lower.numpy(), upper.numpy())
    result = minimize(numpy_fun, x0.numpy(), jac=True, method="L-BFGS-B", bounds=bounds, callback=callback, options=options)  # fmt: skip
    return result, xs, values, counts


def our_path(fun, x0, lower, upper, max_iter, memory=10, gtol=0.0, ftol=0.0, maxls=20, maxfun=15000):
    xs, values, counts = [], [], []

    def callback(iterate):
        xs.append(iterate.x.numpy().copy())
        values.append(iterate.fun)
        counts.append(iterate.nfev)

    result = minimize_box(
        _inside(fun, lower, upper), x0, lower, upper, max_iter=max_iter, memory=memory, gtol=gtol, ftol=ftol,
        max_line_search=maxls, max_fun=maxfun, callback=callback,
    )  # fmt: skip
    return result, xs, values, counts


def _relative(a, b):
    return float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(a))))


def _ulp_bound_split(a, b, lower, upper):
    """Variables on a bound in one iterate and within four ulps of it, but off it, in the other."""
    lower, upper = lower.numpy(), upper.numpy()
    on_a, on_b = (a == lower) | (a == upper), (b == lower) | (b == upper)
    close = np.abs(a - b) <= 4 * np.spacing(np.maximum(np.abs(a), np.abs(b)))
    return np.nonzero((on_a != on_b) & close)[0]


def assert_same_path(fun, x0, lower, upper, max_iter, **options):
    """Our iterates, values and evaluation counts equal scipy's, up to a one-ulp bound split (see the module
    docstring). Returns how many iterates were compared."""
    theirs, xs, fs, counts = scipy_path(fun, x0, lower, upper, max_iter, **options)
    ours, our_xs, our_fs, our_counts = our_path(fun, x0, lower, upper, max_iter, **options)
    for k in range(max(len(xs), len(our_xs))):
        same = (
            k < min(len(xs), len(our_xs))
            and _relative(xs[k], our_xs[k]) <= PATH_TOLERANCE
            and abs(fs[k] - our_fs[k]) <= PATH_TOLERANCE * max(1.0, abs(fs[k]))
            and counts[k] == our_counts[k]
        )
        if not same:
            assert k > 0 and len(_ulp_bound_split(xs[k - 1], our_xs[k - 1], lower, upper)), (
                f"iterate {k + 1} differs from scipy's: counts {counts[: k + 1]} vs {our_counts[: k + 1]}"
            )
            return k
    assert ours.nit == theirs.nit and ours.nfev == theirs.nfev
    assert ours.message.split(":")[0] == theirs.message.split(":")[0]
    np.testing.assert_allclose(ours.x.numpy(), theirs.x, rtol=0, atol=PATH_TOLERANCE * max(1.0, np.abs(theirs.x).max()))
    return len(xs)


# ------------------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [5, 40])
def test_quadratic_path_matches_scipy(n, seed):
    assert assert_same_path(*quadratic(n, seed, condition=10.0 ** (1 + seed % 3)), max_iter=10) == 10


def test_long_paths_match_scipy_through_memory_wraparound():
    """Past m iterations the oldest pair drops out; memory 1 and 3 wrap many times."""
    problem = quadratic(60, 11, condition=1e3)
    assert assert_same_path(*problem, max_iter=40, memory=3) == 40
    assert assert_same_path(*problem, max_iter=25, memory=1) == 25


@pytest.mark.parametrize("n", [2, 10])
def test_rosenbrock_in_a_box_matches_scipy_to_convergence(n):
    """scipy's default tolerances: the same iterations, evaluations and stopping test."""
    assert assert_same_path(*rosenbrock(n), max_iter=200, gtol=1e-5, ftol=2.220446049250313e-09) > 10


@pytest.mark.parametrize("eps", [1e-3, 2e-2, 1e-1])
@pytest.mark.parametrize("seed", range(3))
def test_keskar_box_on_a_small_network_matches_scipy(seed, eps):
    """The paper's setting: 10 iterations maximizing the loss over |y| ≤ ε(|x| + 1) from y = 0."""
    compared = assert_same_path(*mlp_sharpness(seed, eps), max_iter=10)
    assert compared >= 6  # seed 2, ε = 1e-3 meets the one-ulp split after 6 (scipy against itself does too)


def test_line_search_failures_restart_as_scipy_does():
    """maxls = 2 makes searches fail: the memory is reset and the iteration retried; maxls = 1 fails at once
    from an empty memory, the abnormal end."""
    problem = quadratic(60, 11, condition=1e3)
    assert assert_same_path(*problem, max_iter=30, maxls=2) == 30
    assert assert_same_path(*rosenbrock(10), max_iter=30, maxls=3) == 30
    result = minimize_box(*problem, max_line_search=1)
    assert result.message == ABNORMAL and result.nit == 0 and result.nfev == 2


def test_start_on_bounds_matches_scipy():
    fun = separable()
    lower, upper = unit_box()
    mixed = torch.zeros(12, dtype=F64)
    mixed[::2], mixed[1::3] = lower[::2], upper[1::3]
    for start in (lower.clone(), upper.clone(), mixed, torch.full((12,), 5.0, dtype=F64)):  # the last one projected
        assert assert_same_path(fun, start, lower, upper, max_iter=30) > 5


def test_zero_gradient_components_match_scipy():
    centre = torch.linspace(-3, 3, 12, dtype=F64)

    def half(x):  # does not depend on x[6:]
        grad = torch.zeros_like(x)
        grad[:6] = 2 * (x[:6] - centre[:6]) + 4 * x[:6] ** 3
        return float(((x[:6] - centre[:6]) ** 2).sum() + (x[:6] ** 4).sum()), grad

    assert assert_same_path(half, torch.full((12,), 0.3, dtype=F64), *unit_box(), max_iter=30) > 10


def test_all_variables_at_bounds():
    fun, slope = linear()
    lower, upper = unit_box()
    # from the centre every variable reaches its bound in the first Cauchy step, and the search stops there
    assert assert_same_path(fun, torch.zeros(12, dtype=F64), lower, upper, max_iter=10) == 1
    # from that corner the projected gradient is zero: nothing to do
    corner = torch.where(slope > 0, lower, upper)
    result = minimize_box(fun, corner, lower, upper, gtol=0.0, ftol=0.0)
    assert result.nit == 0 and result.message == CONVERGED_GRADIENT and torch.equal(result.x, corner)


def test_line_search_that_hits_the_box():
    """A nearly linear f in a wide box: the step is capped by the box's edge (stpmax)."""
    fun_linear, slope = linear()
    fun = lambda x: (fun_linear(x)[0] + 0.01 * float((x**2).sum()), slope + 0.02 * x)
    assert assert_same_path(fun, torch.zeros(12, dtype=F64), *unit_box(scale=5.0), max_iter=10) == 2


def test_fixed_variables_never_move():
    lower, upper = unit_box()
    lower[3] = upper[3] = 0.25
    lower[7] = upper[7] = -1.0
    assert assert_same_path(separable(), torch.zeros(12, dtype=F64), lower, upper, max_iter=10) == 8
    result = minimize_box(separable(), torch.zeros(12, dtype=F64), lower, upper, gtol=0, ftol=0)
    assert result.x[3] == 0.25 and result.x[7] == -1.0


def test_cauchy_point_in_chunks_matches_scipy(monkeypatch):
    """Tiny chunk sizes send every Cauchy search through topk, the full sort and several chunks."""
    monkeypatch.setattr(_cauchy, "_FIRST_BREAKPOINTS", 3)
    monkeypatch.setattr(_cauchy, "_CHUNK", 2)
    assert assert_same_path(*quadratic(40, 1, condition=100.0), max_iter=10) == 10
    assert assert_same_path(*mlp_sharpness(1, 1e-1), max_iter=10) == 10
    fun, _ = linear(40)
    assert assert_same_path(fun, torch.zeros(40, dtype=F64), *unit_box(40), max_iter=10) == 1


def test_thousands_of_breakpoints_match_scipy():
    """n = 3000: more moving variables than the first topk takes."""
    g = torch.Generator().manual_seed(0)
    n = 3000
    centre = 2 * torch.randn(n, generator=g, dtype=F64)
    scale = torch.rand(n, generator=g, dtype=F64) + 0.5

    def quartic(x):
        d = x - centre
        return float((scale * d**4 + 0.5 * d**2).sum()), 4 * scale * d**3 + d

    lower = -torch.rand(n, generator=g, dtype=F64) - 0.1
    upper = torch.rand(n, generator=g, dtype=F64) + 0.1
    assert assert_same_path(quartic, torch.zeros(n, dtype=F64), lower, upper, max_iter=10) == 10


# ----------------------------------------------------------------------------------------- stopping rules


def test_stopping_rules_and_counts_match_scipy():
    problem = quadratic(40, 3)
    for maxfun in (1, 4):  # checked after each iteration, so the limit can be passed within one
        theirs = scipy_path(*problem, max_iter=50, maxfun=maxfun)[0]
        ours = minimize_box(*problem, max_iter=50, max_fun=maxfun, gtol=0, ftol=0)
        assert (ours.nit, ours.nfev, ours.message) == (theirs.nit, theirs.nfev, STOPPED_EVALUATIONS)
    ours = minimize_box(*problem, max_iter=7, gtol=0, ftol=0)
    assert ours.nit == 7 and ours.message == STOPPED_ITERATIONS and len(ours.history) == 8
    assert ours.history[0] == problem[0](problem[1])[0] and ours.history[-1] == ours.fun


def test_callback_can_stop_the_run_but_the_iteration_limit_names_itself():
    problem = quadratic(40, 3)
    seen = []
    result = minimize_box(*problem, max_iter=10, gtol=0, ftol=0, callback=lambda it: seen.append(it.nit) or it.nit == 3)
    assert seen == [1, 2, 3] and result.nit == 3 and result.message == STOPPED_CALLBACK
    # both at once: scipy reports the iteration limit
    result = minimize_box(*problem, max_iter=3, gtol=0, ftol=0, callback=lambda it: it.nit == 3)
    assert result.nit == 3 and result.message == STOPPED_ITERATIONS


def test_best_point_is_the_lowest_evaluated_value():
    fun, x0, lower, upper = mlp_sharpness(0, 1e-1)
    values = []
    result = minimize_box(lambda x: values.append(fun(x)[0]) or fun(x), x0, lower, upper, max_iter=10, gtol=0, ftol=0)
    assert result.best_fun == min(values) <= result.fun
    assert fun(result.best_x)[0] == result.best_fun
    assert result.to_dict()["best_fun"] == result.best_fun  # tensors are left out of the JSON form


# ------------------------------------------------------------------------------------------------ float32


def test_float32_keeps_its_dtype_and_stays_in_the_box():
    fun32, x0, lower, upper = mlp_sharpness(1, 2e-2, dtype=torch.float32)
    evaluated = []

    def recording(x):
        evaluated.append(x.clone())
        return fun32(x)

    ours = minimize_box(_inside(recording, lower, upper, torch.float32), x0, lower, upper, max_iter=10, gtol=0, ftol=0)
    assert ours.x.dtype == torch.float32 and ours.grad.dtype == torch.float32 and ours.best_x.dtype == torch.float32
    assert ours.nit == 10 and len(evaluated) == ours.nfev
    # the same ascent as scipy's float64 run, to float32's accuracy
    fun64, x64, lower64, upper64 = mlp_sharpness(1, 2e-2)
    theirs = scipy_path(fun64, x64, lower64, upper64, max_iter=10)[0]
    assert abs(ours.fun - theirs.fun) <= 1e-5 * abs(theirs.fun)
    assert float((ours.x.double() - torch.from_numpy(theirs.x)).abs().max()) <= 1e-3 * float(upper64.abs().max())


# -------------------------------------------------------------------------------------------- bad input


def _fun(x):
    return float((x**2).sum()), 2 * x


def test_bad_boxes_are_named():
    x0, lower, upper = torch.zeros(4, dtype=F64), -torch.ones(4, dtype=F64), torch.ones(4, dtype=F64)
    with pytest.raises(HessgapError, match="lower has shape"):
        minimize_box(_fun, x0, lower[:3], upper)
    with pytest.raises(HessgapError, match="lower > upper for 1 variables .*index 2"):
        minimize_box(_fun, x0, lower, torch.tensor([1.0, 1.0, -2.0, 1.0], dtype=F64))
    with pytest.raises(NonFiniteError, match="x0 has 1 non-finite"):
        minimize_box(_fun, torch.tensor([0.0, math.nan, 0.0, 0.0], dtype=F64), lower, upper)
    with pytest.raises(NonFiniteError, match="upper has 4 non-finite.*finite bounds"):
        minimize_box(_fun, x0, lower, torch.full((4,), math.inf, dtype=F64))
    with pytest.raises(HessgapError, match="1-D tensor"):
        minimize_box(_fun, x0.view(2, 2), lower.view(2, 2), upper.view(2, 2))
    with pytest.raises(HessgapError, match="floating-point"):
        minimize_box(_fun, torch.zeros(4, dtype=torch.long), lower, upper)
    with pytest.raises(HessgapError, match="x0 must be a torch tensor"):
        minimize_box(_fun, [0.0] * 4, lower, upper)
    with pytest.raises(HessgapError, match="memory must be a positive integer"):
        minimize_box(_fun, x0, lower, upper, memory=0)
    with pytest.raises(HessgapError, match="gtol must be a finite number ≥ 0"):
        minimize_box(_fun, x0, lower, upper, gtol=-1.0)


def test_bad_objectives_are_named():
    x0, lower, upper = torch.zeros(4, dtype=F64), -torch.ones(4, dtype=F64), torch.ones(4, dtype=F64)
    with pytest.raises(NonFiniteError, match="non-finite value"):
        minimize_box(lambda x: (math.nan, 2 * x), x0, lower, upper)
    with pytest.raises(NonFiniteError, match="gradient with NaN"):
        minimize_box(lambda x: (1.0, x / 0), x0, lower, upper)
    with pytest.raises(HessgapError, match=r"gradient of shape \(3,\) for x of shape \(4,\)"):
        minimize_box(lambda x: (1.0, x[:3]), x0, lower, upper)
    with pytest.raises(HessgapError, match="gradient as a tensor"):
        minimize_box(lambda x: (1.0, x.tolist()), x0, lower, upper)
    with pytest.raises(HessgapError, match="real number as value"):
        minimize_box(lambda x: ("one", x), x0, lower, upper)
    # a non-finite value met in a line search is named too, not taken as a step
    with pytest.raises(NonFiniteError, match="non-finite value"):
        minimize_box(lambda x: (float((x**2).sum()) if x.min() >= 0 else math.inf, 2 * x), x0 + 0.4, lower, upper)


# ------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_path_equals_the_cpu_path():
    fun, x0, lower, upper = mlp_sharpness(0, 2e-2)
    cpu = minimize_box(fun, x0, lower, upper, max_iter=10, gtol=0, ftol=0)

    def on_cuda(y):
        value, grad = fun(y.cpu())
        return value, grad.cuda()

    gpu = minimize_box(on_cuda, x0.cuda(), lower.cuda(), upper.cuda(), max_iter=10, gtol=0, ftol=0)
    assert gpu.x.is_cuda and (gpu.nit, gpu.nfev) == (cpu.nit, cpu.nfev)
    assert float((gpu.x.cpu() - cpu.x).abs().max()) <= 1e-12
