"""hessgap.sharpness against closed-form box maxima, L-BFGS-B, and the model-restoration contract."""

import copy
import functools
import json
import math

import pytest
import torch
from torch import nn

import hessgap
from hessgap import _extension
from hessgap.errors import HessgapError, NonFiniteError
from hessgap.sharp import solvers

ONE_BATCH = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))


pytestmark = pytest.mark.usefixtures("one_thread")


def _identity_loss(outputs, targets):
    return outputs


class Separable(nn.Module):
    """loss(w) = Σ a_i w_i² + Σ b_i w_i + c: the forward pass returns the loss itself."""

    def __init__(self, x, a, b, c=0.0):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(x, dtype=torch.float64).clone())
        self.register_buffer("a", torch.as_tensor(a, dtype=torch.float64))
        self.register_buffer("b", torch.as_tensor(b, dtype=torch.float64))
        self.c = c

    def forward(self, inputs):
        return (self.a * self.w**2).sum() + (self.b * self.w).sum() + self.c


def _box_max_of_quadratic(x, a, r):
    """max over |y| ≤ r of Σ a (x + y)², coordinate by coordinate."""
    far = (x.abs() + r) ** 2  # convex coordinate: the face away from 0
    near = torch.clamp(x.abs() - r, min=0.0) ** 2  # concave coordinate: as close to 0 as the box allows
    return float(torch.where(a > 0, a * far, a * near).sum())


def _metric(max_loss, loss):
    return (max_loss - loss) / (1 + loss) * 100


# ------------------------------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("solver,momentum", [("box-ascent", 0.0), ("box-ascent", 0.25), ("lbfgsb", 0.0)])
def test_convex_quadratic_reaches_box_corner(solver, momentum):
    torch.manual_seed(1)
    x = torch.randn(13, dtype=torch.float64)
    a = torch.rand(13, dtype=torch.float64) + 0.5
    model = Separable(x, a, torch.zeros(13))
    eps = 1e-2
    result = hessgap.sharpness(model, ONE_BATCH, epsilon=eps, loss_fn=_identity_loss, solver=solver, momentum=momentum)
    loss = float((a * x**2).sum())
    max_loss = _box_max_of_quadratic(x, a, eps * (x.abs() + 1))
    assert result.loss == pytest.approx(loss, rel=1e-12)
    assert result.max_loss == pytest.approx(max_loss, rel=1e-10)
    assert result.value == pytest.approx(_metric(max_loss, loss), rel=1e-8)


@pytest.mark.parametrize("momentum", [0.0, 0.25])
def test_quadratic_with_concave_coordinates_and_interior_maxima(momentum):
    # a < 0 with |x| < r: the maximum is interior (y = −x), reached only by the step halving
    x = torch.tensor([0.8, -1.5, 0.003, -0.002, 0.4, -0.004], dtype=torch.float64)
    a = torch.tensor([1.0, 2.0, -3.0, -1.0, -0.5, -2.0], dtype=torch.float64)
    model = Separable(x, a, torch.zeros(6), c=1.0)
    eps = 1e-2
    result = hessgap.sharpness(
        model, ONE_BATCH, epsilon=eps, loss_fn=_identity_loss, max_iter=40, momentum=momentum, tol=0.0
    )
    max_loss = 1.0 + _box_max_of_quadratic(x, a, eps * (x.abs() + 1))
    assert result.max_loss <= max_loss + 1e-12
    assert result.max_loss == pytest.approx(max_loss, abs=1e-7)
    assert result.restarts > 0  # the halving did the work


@pytest.mark.parametrize("solver", ["box-ascent", "lbfgsb"])
def test_linear_function_maximum_is_the_corner(solver):
    torch.manual_seed(2)
    x = torch.randn(11, dtype=torch.float64)
    b = torch.randn(11, dtype=torch.float64)
    model = Separable(x, torch.zeros(11), b, c=3.0)
    eps = 1e-3
    result = hessgap.sharpness(model, ONE_BATCH, epsilon=eps, loss_fn=_identity_loss, solver=solver)
    loss = float(b @ x) + 3.0
    increase = float((b.abs() * eps * (x.abs() + 1)).sum())
    assert result.max_loss - result.loss == pytest.approx(increase, rel=1e-9)
    assert result.value == pytest.approx(_metric(loss + increase, loss), rel=1e-8)


def test_stationary_point_still_moves_to_a_corner():
    # at x = 0 the gradient of Σ a w² vanishes; the first step breaks the ties and finds a corner
    a = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    model = Separable(torch.zeros(3), a, torch.zeros(3))
    result = hessgap.sharpness(model, ONE_BATCH, epsilon=0.1, loss_fn=_identity_loss)
    assert result.max_loss == pytest.approx(float(a.sum()) * 0.01, rel=1e-12)


def test_adaptive_l2_at_a_stationary_point_moves_to_the_sphere():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    a = torch.ones(3, dtype=torch.float64)
    model = Separable(x, a, -2 * a * x)  # f = Σ w² − 2x·w: gradient 0 at w = x
    result = hessgap.adaptive_sharpness(model, ONE_BATCH, rho=0.1, norm="l2", loss_fn=_identity_loss)
    assert result.value > 0 and result.iterations >= 1


def test_adaptive_linf_and_l2_on_a_linear_function():
    torch.manual_seed(3)
    x = torch.randn(9, dtype=torch.float64)
    x[4] = 0.0  # a zero weight cannot move under c = |w|
    b = torch.randn(9, dtype=torch.float64)
    model = Separable(x, torch.zeros(9), b, c=2.0)
    rho = 0.05
    linf = hessgap.adaptive_sharpness(model, ONE_BATCH, rho=rho, loss_fn=_identity_loss)
    assert linf.value == pytest.approx(float((b.abs() * rho * x.abs()).sum()), rel=1e-9)
    assert linf.kind == "adaptive" and linf.epsilon == rho
    ref = hessgap.adaptive_sharpness(model, ONE_BATCH, rho=rho, loss_fn=_identity_loss, solver="lbfgsb")
    assert ref.value == pytest.approx(linf.value, rel=1e-9)
    l2 = hessgap.adaptive_sharpness(model, ONE_BATCH, rho=rho, norm="l2", loss_fn=_identity_loss)
    # max of b·δ over ‖δ/|x|‖₂ ≤ ρ is ρ‖b ⊙ |x|‖₂
    assert l2.value == pytest.approx(rho * float((b * x.abs()).norm()), rel=1e-9)
    assert l2.norm == "l2"


def test_adaptive_l2_on_a_convex_quadratic_matches_the_dual_bound():
    # f = Σ w², x = ±1, δ = |x| ⊙ u, ‖u‖ ≤ ρ: with v = sign(x) ⊙ u, f(x + δ) = Σ (1 + v_i)², whose
    # maximum over ‖v‖ ≤ ρ is at v = ρ/√n (Lagrange): n (1 + ρ/√n)²
    n = 4
    x = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    a = torch.ones(n, dtype=torch.float64)
    model = Separable(x, a, torch.zeros(n))
    rho = 0.2
    result = hessgap.adaptive_sharpness(model, ONE_BATCH, rho=rho, norm="l2", loss_fn=_identity_loss, max_iter=20)
    expected = n * (1 + rho / math.sqrt(n)) ** 2 - n
    assert result.value == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------------------------------------ trained MLPs


def _trained_mlp(batch_size, steps, seed, dtype=torch.float32, samples=256, lr=1e-2):
    """A small BatchNorm MLP trained with ADAM (cached: each configuration trains once per test run)."""
    model, loader = _train(batch_size, steps, seed, dtype, samples, lr)
    return copy.deepcopy(model), loader


@functools.lru_cache(maxsize=None)
def _train(batch_size, steps, seed, dtype, samples, lr):
    torch.manual_seed(seed)
    inputs = torch.randn(samples, 12, dtype=dtype)
    targets = (inputs[:, :3].sum(1) > 0).long() + (inputs[:, 3] > 1).long()
    model = nn.Sequential(
        nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    ).to(dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        start = (step * batch_size) % samples
        xb, yb = inputs[start : start + batch_size], targets[start : start + batch_size]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    loader = [(inputs[i : i + 64], targets[i : i + 64]) for i in range(0, samples, 64)]
    return model, loader


# (batch size, steps, seed, dtype, samples, lr): small-batch, large-batch, and a float64 model at loss ~1e-5
SB = (32, 100, 0, torch.float32, 256, 1e-2)
LB = (256, 200, 1, torch.float32, 256, 1e-2)
TINY_LOSS = (128, 300, 2, torch.float64, 128, 2e-2)


@pytest.mark.parametrize("config", [SB, LB, TINY_LOSS], ids=["sb", "lb", "tiny-loss"])
def test_box_ascent_finds_at_least_lbfgsb_on_trained_mlps(config):
    model, loader = _trained_mlp(*config)
    for eps in (1e-3, 5e-4):
        ours = hessgap.sharpness(model, loader, epsilon=eps)
        paper = hessgap.sharpness(model, loader, epsilon=eps, solver="lbfgsb")
        assert ours.loss == paper.loss
        assert ours.value >= paper.value > 0
        assert ours.evaluations == ours.iterations + 1 <= 11


def test_both_solvers_at_a_very_low_loss_point():
    # the regime: a training loss ~1e-5, where L-BFGS-B from y = 0 stalls
    model, loader = _trained_mlp(*TINY_LOSS)
    ours = hessgap.sharpness(model, loader, epsilon=1e-3)
    assert ours.loss < 1e-4
    # with scipy's default tolerances the gradient (~1e-5) already passes gtol: nothing moves
    stalled = hessgap.sharpness(
        model, loader, epsilon=1e-3, solver="lbfgsb", lbfgsb_options={"gtol": 1e-5, "ftol": 2.2e-9}
    )
    assert stalled.evaluations == 1 and stalled.value == 0.0 and "PGTOL" in stalled.message
    # the default runs all 10 iterations and still stays well below the sign ascent
    paper = hessgap.sharpness(model, loader, epsilon=1e-3, solver="lbfgsb")
    assert paper.iterations == 10 and paper.evaluations > 10
    assert ours.value > 2 * paper.value > 0


def test_the_user_gets_the_compiled_step_and_it_matches_the_reference(monkeypatch):
    model, loader = _trained_mlp(*SB)
    fused = hessgap.sharpness(model, loader)
    if _extension.available():
        assert fused.kernel == "compiled"
    from hessgap.ops import box_ascent as ops

    monkeypatch.setattr(solvers, "step_function", lambda device: (ops.box_ascent_step_reference, "reference"))
    reference = hessgap.sharpness(model, loader)
    assert reference.kernel == "reference"
    assert fused.max_loss == reference.max_loss  # the kernel is bit-identical to its twin
    assert fused.history == reference.history


def test_result_is_json_and_counts_are_honest():
    model, loader = _trained_mlp(*SB)
    calls = {"n": 0}

    def counting_loss(outputs, targets):
        calls["n"] += 1
        return nn.functional.cross_entropy(outputs, targets)

    result = hessgap.sharpness(model, loader, loss_fn=counting_loss, max_iter=4, cache_batches=True, momentum=0.0)
    data = json.loads(result.to_json())
    for key in ("value", "loss", "max_loss", "epsilon", "subspace_dim", "solver", "iterations", "evaluations", "seconds"):
        assert key in data
    assert data["solver"] == "box-ascent" and data["subspace_dim"] is None
    assert result.evaluations == len(result.history) == calls["n"] // len(loader)
    assert result.max_loss == max(result.history)
    assert result.num_samples == 256
    assert result.seconds > 0
    assert "sharpness" in str(result)


def test_tol_stops_a_converged_ascent_early():
    model, loader = _trained_mlp(*LB)
    converged = hessgap.sharpness(model, loader, max_iter=30, tol=1e-2)
    full = hessgap.sharpness(model, loader, max_iter=30, tol=0.0)
    assert converged.iterations < full.iterations
    assert converged.max_loss <= full.max_loss
    gains = [b - a for a, b in zip(converged.history, converged.history[1:])]
    assert 0 <= gains[-1] < 1e-2 * (converged.max_loss - converged.loss)


def test_max_batches_limits_the_loss_to_the_first_batches():
    model, loader = _trained_mlp(*SB)
    result = hessgap.sharpness(model, loader, max_batches=1, max_iter=2)
    with torch.no_grad():
        model.eval()
        first = float(nn.functional.cross_entropy(model(loader[0][0]), loader[0][1]))
    assert result.loss == pytest.approx(first, rel=1e-6)


def test_data_in_another_dtype_is_cast_to_the_model():
    model, loader = _trained_mlp(*SB)
    as_double = [(xb.double(), yb) for xb, yb in loader]
    assert hessgap.sharpness(model, as_double, max_iter=3).max_loss == hessgap.sharpness(model, loader, max_iter=3).max_loss


def test_progress_bar(capsys):
    model, loader = _trained_mlp(*SB)
    hessgap.sharpness(model, loader, max_iter=2, progress=True)
    assert "sharpness" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ restoration


def _state(model):
    return (
        {k: v.detach().clone() for k, v in model.named_parameters()},
        {k: v.detach().clone() for k, v in model.named_buffers()},
        {k: (None if v.grad is None else v.grad.clone()) for k, v in model.named_parameters()},
        [m.training for m in model.modules()],
    )


def _assert_same(model, before):
    params, buffers, grads, modes = _state(model)
    for k in before[0]:
        assert torch.equal(params[k], before[0][k]), k
    for k in before[1]:
        assert torch.equal(buffers[k], before[1][k]), k
    for k in before[2]:
        assert (grads[k] is None) == (before[2][k] is None), k
        if grads[k] is not None:
            assert torch.equal(grads[k], before[2][k]), k
    assert modes == before[3]


def _prepared_model():
    model, loader = _trained_mlp(*SB)
    model.train()
    model[1].eval()  # mixed modes must come back as they were
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)
    return model, loader


CASES = [
    dict(),
    dict(solver="lbfgsb"),
    dict(subspace_dim=5),
    dict(kind="adaptive", norm="l2", momentum=0.25),
    dict(train_mode=True, momentum=0.25),
]


@pytest.mark.parametrize("options", CASES)
def test_model_restored_after_success(options):
    model, loader = _prepared_model()
    before = _state(model)
    result = hessgap.sharpness(model, loader, max_iter=3, **options)
    assert result.value > 0
    _assert_same(model, before)


@pytest.mark.parametrize("options", CASES)
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_model_restored_after_error_or_interrupt_inside_the_loss(options, error):
    model, loader = _prepared_model()
    before = _state(model)
    calls = {"n": 0}

    def failing_loss(outputs, targets):
        calls["n"] += 1
        if calls["n"] == len(loader) + 3:  # inside the second evaluation, after the weights moved
            raise error("stop")
        return nn.functional.cross_entropy(outputs, targets)

    with pytest.raises(error):
        hessgap.sharpness(model, loader, loss_fn=failing_loss, max_iter=3, **options)
    _assert_same(model, before)


def test_train_mode_differs_from_eval_and_keeps_batchnorm_statistics():
    model, loader = _prepared_model()
    before = _state(model)
    train = hessgap.sharpness(model, loader, train_mode=True, max_iter=2)
    evaluated = hessgap.sharpness(model, loader, max_iter=2)
    assert train.loss != evaluated.loss and train.train_mode and not evaluated.train_mode
    _assert_same(model, before)


# ------------------------------------------------------------------------------------------ bad input


def _small():
    return nn.Sequential(nn.Linear(3, 2)), [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epsilon=0.0), "epsilon must be a finite number > 0"),
        (dict(epsilon=-1e-3), "epsilon must be a finite number > 0"),
        (dict(epsilon=float("nan")), "epsilon must be a finite number > 0"),
        (dict(epsilon="big"), "epsilon must be a finite number > 0"),
        (dict(subspace_dim=0), "subspace_dim must be between 1 and the number of trainable parameters"),
        (dict(subspace_dim=-3), "subspace_dim must be between 1"),
        (dict(subspace_dim=9), r"number of trainable parameters \(8\)"),
        (dict(subspace_dim=2.5), "subspace_dim must be an integer"),
        (dict(solver="adam"), "unknown solver 'adam'"),
        (dict(kind="flat"), "unknown sharpness kind"),
        (dict(norm="l1", kind="adaptive"), "unknown norm"),
        (dict(norm="l2"), "norm='l2' needs kind='adaptive'"),
        (dict(norm="l2", kind="adaptive", solver="lbfgsb"), "L-BFGS-B handles box bounds only"),
        (dict(kind="adaptive", subspace_dim=2), "adaptive sharpness is defined in the full space"),
        (dict(max_iter=0), "max_iter must be a positive integer"),
        (dict(momentum=1.0), "momentum must be in"),
        (dict(subspace_dim=2, subspace_scale="huge"), "subspace_scale must be one of"),
        (dict(max_batches=0), "max_batches must be a positive number"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(tol=-0.1), "tol must be in"),
    ],
)
def test_bad_arguments(kwargs, match):
    model, loader = _small()
    with pytest.raises(HessgapError, match=match):
        hessgap.sharpness(model, loader, **kwargs)


def test_bad_rho():
    model, loader = _small()
    with pytest.raises(HessgapError, match="rho must be a finite number > 0"):
        hessgap.adaptive_sharpness(model, loader, rho=0)
    with pytest.raises(HessgapError, match="unknown norm"):
        hessgap.adaptive_sharpness(model, loader, norm="linf2")


def test_empty_loader():
    model, _ = _small()
    before = _state(model)
    with pytest.raises(HessgapError, match="yielded no batches"):
        hessgap.sharpness(model, [])
    _assert_same(model, before)


def test_no_trainable_parameters():
    model, loader = _small()
    model.requires_grad_(False)
    with pytest.raises(HessgapError, match="no trainable parameters"):
        hessgap.sharpness(model, loader)


def test_non_finite_loss_at_x():
    model, loader = _small()
    bad = [(loader[0][0].clone().fill_(float("inf")), loader[0][1])]
    with pytest.raises(NonFiniteError, match="loss over the data is"):
        hessgap.sharpness(model, bad)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="holds NaN or inf"):
        hessgap.sharpness(model, loader)


def test_mixed_dtypes_within_the_model():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2).double())
    with pytest.raises(HessgapError, match="several dtypes"):
        hessgap.sharpness(model, [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))])
    bn = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    bn[1].running_mean = bn[1].running_mean.double()
    with pytest.raises(HessgapError, match="buffer 1.running_mean is torch.float64"):
        hessgap.sharpness(bn, [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))])


def test_mixed_devices_within_the_model():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    model[1].to("meta")
    with pytest.raises(HessgapError, match="several devices"):
        hessgap.sharpness(model, [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))])
    bn = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    bn[1].running_var = torch.ones(2, device="meta")
    with pytest.raises(HessgapError, match="buffer 1.running_var is on meta"):
        hessgap.sharpness(bn, [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))])


def test_not_a_model():
    with pytest.raises(HessgapError, match="expected a torch.nn.Module"):
        hessgap.sharpness(lambda x: x, [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))])


@pytest.mark.parametrize("config,seed", [(SB, 1), (LB, 0), (TINY_LOSS, 0)], ids=["sb", "lb", "tiny-loss"])
def test_default_finds_at_least_lbfgsb_in_a_random_subspace(config, seed):
    # in these subspaces sign ascent stops lower than L-BFGS-B (LB: 0.61 against 2.97, at a box vertex
    # whose gradient signs all point outwards); the default must still reach L-BFGS-B's value
    model, loader = _trained_mlp(*config)
    ours = hessgap.sharpness(model, loader, subspace_dim=100, seed=seed)
    paper = hessgap.sharpness(model, loader, subspace_dim=100, seed=seed, solver="lbfgsb")
    assert ours.loss == paper.loss
    assert ours.value >= paper.value > 0
    # the result names what ran: in a subspace the default follows L-BFGS-B's path
    assert ours.solver == "lbfgsb" and ours.subspace_dim == 100


@pytest.mark.parametrize(
    "solver,subspace_dim,norm,runs",
    [
        ("auto", None, "linf", "box-ascent"),
        ("auto", None, "l2", "box-ascent"),
        ("auto", 100, "linf", "lbfgsb"),
        ("box-ascent", 100, "linf", "box-ascent"),
        ("box-ascent", None, "l2", "box-ascent"),
        ("lbfgsb", None, "linf", "lbfgsb"),
        ("lbfgsb", 100, "linf", "lbfgsb"),
    ],
)
def test_resolve_names_the_solver_that_runs(solver, subspace_dim, norm, runs):
    assert solvers.resolve(solver, subspace_dim, norm) == runs


def test_resolve_refuses_unknown_solvers_and_lbfgsb_on_the_ball():
    with pytest.raises(HessgapError, match="unknown solver 'adam'"):
        solvers.resolve("adam", None, "linf")
    with pytest.raises(HessgapError, match="L-BFGS-B handles box bounds only"):
        solvers.resolve("lbfgsb", None, "l2")


def test_result_names_the_solver_asked_for_and_the_one_that_ran():
    model, loader = _small()
    full = hessgap.sharpness(model, loader, max_iter=2)
    assert (full.solver_requested, full.solver) == ("auto", "box-ascent")
    sub = hessgap.sharpness(model, loader, max_iter=2, subspace_dim=3)
    assert (sub.solver_requested, sub.solver) == ("auto", "lbfgsb") and "lbfgsb (auto)" in str(sub)
    sign = hessgap.sharpness(model, loader, max_iter=2, subspace_dim=3, solver="box-ascent")
    assert (sign.solver_requested, sign.solver) == ("box-ascent", "box-ascent") and sign.kernel != "scipy"
    assert json.loads(sign.to_json())["solver_requested"] == "box-ascent"


def test_shared_checks_name_the_argument():
    model, loader = _small()
    with pytest.raises(HessgapError, match="seed must be an integer ≥ 0, got -1"):
        hessgap.sharpness(model, loader, seed=-1)
    with pytest.raises(HessgapError, match="tol must be in"):
        hessgap.sharpness(model, loader, tol=float("nan"))
    with pytest.raises(HessgapError, match="max_iter must be a positive integer, got 2.0"):
        hessgap.sharpness(model, loader, max_iter=2.0)
