"""hessgap.sharpness and adaptive_sharpness (hessgap.sharp.metric): the metrics' definitions, the result,
the model-restoration contract and the checks on bad input."""

import json
import math

import pytest
import torch
from torch import nn

import hessgap
from hessgap.errors import HessgapError, NonFiniteError

from oracles import ONE_BATCH, SB, Separable, identity_loss, trained_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ adaptive sharpness


def test_adaptive_l2_at_a_stationary_point_moves_to_the_sphere():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    a = torch.ones(3, dtype=torch.float64)
    model = Separable(x, a, -2 * a * x)  # f = Σ w² − 2x·w: gradient 0 at w = x
    result = hessgap.adaptive_sharpness(model, ONE_BATCH, rho=0.1, norm="l2", loss_fn=identity_loss)
    assert result.value > 0 and result.iterations >= 1


def test_adaptive_linf_and_l2_on_a_linear_function():
    torch.manual_seed(3)
    x = torch.randn(9, dtype=torch.float64)
    x[4] = 0.0  # a zero weight cannot move under c = |w|
    b = torch.randn(9, dtype=torch.float64)
    model = Separable(x, torch.zeros(9), b, c=2.0)
    rho = 0.05
    linf = hessgap.adaptive_sharpness(model, ONE_BATCH, rho=rho, loss_fn=identity_loss)
    assert linf.value == pytest.approx(float((b.abs() * rho * x.abs()).sum()), rel=1e-9)
    assert linf.kind == "adaptive" and linf.epsilon == rho
    ref = hessgap.adaptive_sharpness(model, ONE_BATCH, rho=rho, loss_fn=identity_loss, solver="lbfgsb")
    assert ref.value == pytest.approx(linf.value, rel=1e-9)
    l2 = hessgap.adaptive_sharpness(model, ONE_BATCH, rho=rho, norm="l2", loss_fn=identity_loss)
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
    result = hessgap.adaptive_sharpness(model, ONE_BATCH, rho=rho, norm="l2", loss_fn=identity_loss, max_iter=20)
    expected = n * (1 + rho / math.sqrt(n)) ** 2 - n
    assert result.value == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------------------------------------ the result


def test_result_is_json_and_counts_are_honest():
    model, loader = trained_mlp(*SB)
    calls = {"n": 0}

    def counting_loss(outputs, targets):
        calls["n"] += 1
        return nn.functional.cross_entropy(outputs, targets)

    result = hessgap.sharpness(model, loader, loss_fn=counting_loss, max_iter=4, cache_batches=True, momentum=0.0)
    data = json.loads(result.to_json())
    for key in ("value", "loss", "max_loss", "epsilon", "subspace_dim", "solver", "iterations", "evaluations", "seconds"):
        assert key in data
    assert data["solver"] == "lbfgsb+box-ascent" and data["subspace_dim"] is None
    assert result.evaluations == len(result.history) == calls["n"] // len(loader)
    assert result.max_loss == max(result.history)
    assert result.num_samples == 256
    assert result.seconds > 0
    assert "sharpness" in str(result)


def test_max_batches_limits_the_loss_to_the_first_batches():
    model, loader = trained_mlp(*SB)
    result = hessgap.sharpness(model, loader, max_batches=1, max_iter=2)
    with torch.no_grad():
        model.eval()
        first = float(nn.functional.cross_entropy(model(loader[0][0]), loader[0][1]))
    assert result.loss == pytest.approx(first, rel=1e-6)


def test_data_in_another_dtype_is_cast_to_the_model():
    model, loader = trained_mlp(*SB)
    as_double = [(xb.double(), yb) for xb, yb in loader]
    assert hessgap.sharpness(model, as_double, max_iter=3).max_loss == hessgap.sharpness(model, loader, max_iter=3).max_loss


def test_progress_bar(capsys):
    model, loader = trained_mlp(*SB)
    hessgap.sharpness(model, loader, max_iter=2, progress=True)
    assert "sharpness" in capsys.readouterr().err


def test_result_names_the_solver_asked_for_and_the_one_that_ran():
    model, loader = _small()
    full = hessgap.sharpness(model, loader, max_iter=2)
    assert (full.solver_requested, full.solver) == ("auto", "lbfgsb+box-ascent")
    assert set(full.solver_values) == {"lbfgsb", "box-ascent"} and full.value == max(full.solver_values.values())
    assert full.solver_values[full.best_solver] == full.value
    sub = hessgap.sharpness(model, loader, max_iter=2, subspace_dim=3)
    assert (sub.solver_requested, sub.solver) == ("auto", "lbfgsb+box-ascent") and "lbfgsb+box-ascent (auto)" in str(sub)
    sign = hessgap.sharpness(model, loader, max_iter=2, subspace_dim=3, solver="box-ascent")
    assert (sign.solver_requested, sign.solver) == ("box-ascent", "box-ascent") and sign.kernel != "scipy"
    assert json.loads(sign.to_json())["solver_requested"] == "box-ascent"


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
    model, loader = trained_mlp(*SB)
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


def test_shared_checks_name_the_argument():
    model, loader = _small()
    with pytest.raises(HessgapError, match="seed must be an integer ≥ 0, got -1"):
        hessgap.sharpness(model, loader, seed=-1)
    with pytest.raises(HessgapError, match="tol must be in"):
        hessgap.sharpness(model, loader, tol=float("nan"))
    with pytest.raises(HessgapError, match="max_iter must be a positive integer, got 2.0"):
        hessgap.sharpness(model, loader, max_iter=2.0)


# ------------------------------------------------------------------------------------------ bad input that used to
# reach torch or scipy and came back as their raw errors


@pytest.mark.parametrize("solver", ["box-ascent", "lbfgsb"])
def test_epsilon_below_the_dtype_resolution(solver):
    """Was: scipy's AttributeError: nit (L-BFGS-B on an empty box)."""
    model, loader = _small()
    with pytest.raises(HessgapError, match="epsilon=1e-50 is below what torch.float32 resolves"):
        hessgap.sharpness(model, loader, epsilon=1e-50, solver=solver)


def test_epsilon_that_overflows():
    """Was: 'hessgap: step must be a finite number, got inf', an error about the op's arguments."""
    model, loader = _small()
    with pytest.raises(HessgapError, match="epsilon=1e\\+300 makes the box overflow"):
        hessgap.sharpness(model, loader, epsilon=1e300)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("subspace_dim", [None, 4])
def test_half_precision_is_refused_with_the_reason(dtype, subspace_dim):
    """Was: a raw kernel error in the full space, and 0.0 (bfloat16) in a subspace."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(dtype)
    loader = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    with pytest.raises(HessgapError, match="round back to x; measure a float32 copy"):
        hessgap.sharpness(model, loader, subspace_dim=subspace_dim)


@pytest.mark.parametrize(
    "batch,match",
    [
        ((torch.randn(4, 3), torch.tensor([0.0, 1.0, 0.0, 1.0])), "floating targets of shape \\(4,\\)"),
        ((torch.randn(4, 3), torch.tensor([0, 1, 5, 1])), "targets range over \\[0, 5\\] but the model has 2 classes"),
        ((torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long)), "expected class indices of shape \\(4,\\)"),
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.bool)), "targets of dtype torch.bool"),
        ((torch.ones(4, 3, dtype=torch.long), torch.tensor([0, 1, 0, 1])), "batch 0 .*input \\(4, 3\\) int64"),
        ((torch.randn(4, 5), torch.tensor([0, 1, 0, 1])), "batch 0 .*shapes cannot be multiplied"),
    ],
)
def test_batches_the_model_or_loss_cannot_take_name_the_batch(batch, match):
    """Was: IndexError / RuntimeError from inside cross_entropy or the first layer, 11-26 frames deep."""
    model, _ = _small()
    with pytest.raises(HessgapError, match=match):
        hessgap.sharpness(model, [batch])
