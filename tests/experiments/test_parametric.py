"""The parametric plots' interpolation (Figures 3 and 7): both paths pass through the two minimizers,
BatchNorm statistics are interpolated and clamped, and a curve point matches a hand-built midpoint."""

import math

import pytest
import torch
import torch.nn.functional as F

from hessgap.errors import HessgapError
from hessgap.experiments import parametric
from hessgap.train.data import load_dataset
from hessgap.train.models import build_model

from tiny_runs import tiny_settings

pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_model(seed: int, width: float = 0.02):
    torch.manual_seed(seed)
    model = build_model("F1", (1, 8, 8), 10, width=width)
    with torch.no_grad():  # non-trivial running statistics, as after training
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return model.eval()


def test_paths_pass_through_both_minimizers():
    a, b = _bn_model(0).state_dict(), _bn_model(1).state_dict()
    for path in ("linear", "curved"):
        at0, _ = parametric.interpolate_state(a, b, *parametric.coefficients(0.0, path))
        at1, _ = parametric.interpolate_state(a, b, *parametric.coefficients(1.0, path))
        for key in a:
            assert torch.equal(at0[key], a[key]), (path, key)
            torch.testing.assert_close(at1[key], b[key], rtol=0, atol=1e-6)
    assert parametric.coefficients(0.5, "curved") == pytest.approx((math.sqrt(0.5), math.sqrt(0.5)))
    assert parametric.coefficients(-1.0, "linear") == (2.0, -1.0)
    with pytest.raises(HessgapError, match="linear, curved"):
        parametric.coefficients(0.5, "spline")


def test_extrapolated_batchnorm_variances_are_clamped_and_counted():
    a, b = _bn_model(0).state_dict(), _bn_model(1).state_dict()
    state, clamped = parametric.interpolate_state(a, b, 2.0, -1.0)  # linear path at α = -1
    expected = 0
    for key in a:
        if key.endswith("running_var"):
            raw = 2.0 * a[key] - b[key]
            expected += int((raw < 0).sum())
            assert torch.equal(state[key], raw.clamp_min(0))
        elif key.endswith("num_batches_tracked"):
            assert torch.equal(state[key], a[key])
    assert clamped == expected > 0


def test_interpolating_different_architectures_is_an_error():
    with pytest.raises(HessgapError, match="same model, width and depth"):
        parametric.check_compatible(_bn_model(0, 0.02).state_dict(), _bn_model(1, 0.05).state_dict())


def test_curve_matches_a_hand_built_midpoint():
    settings = tiny_settings()
    sb, lb = _bn_model(0), _bn_model(1)
    curve = parametric.curve(sb, lb, settings, "linear", alphas=[0.0, 0.5], progress=False)
    data = load_dataset("digits")
    x_train, y_train = data.train.tensors
    x_test, y_test = data.test.tensors
    # independent midpoint: average every parameter and buffer through named_parameters / named_buffers
    mid = build_model("F1", (1, 8, 8), 10, width=0.02).eval()
    with torch.no_grad():
        for (_name, p), pa, pb in zip(mid.named_parameters(), sb.parameters(), lb.parameters()):
            p.copy_(0.5 * pa + 0.5 * pb)
        for (_name, buf), ba, bb in zip(mid.named_buffers(), sb.buffers(), lb.buffers()):
            if buf.is_floating_point():
                buf.copy_(0.5 * ba + 0.5 * bb)
        for model, i in ((sb, 0), (mid, 1)):
            logits = model(x_train.double().float())
            assert curve["train_loss"][i] == pytest.approx(F.cross_entropy(logits, y_train).item(), rel=1e-5)
            assert curve["train_acc"][i] == pytest.approx(100 * (logits.argmax(1) == y_train).double().mean().item())
            assert curve["test_acc"][i] == pytest.approx(100 * (model(x_test).argmax(1) == y_test).double().mean().item())
    assert curve["clamped_variances"] == [0, 0]
    for p, q in zip(sb.parameters(), _bn_model(0).parameters()):  # the models are left untouched
        assert torch.equal(p, q)


def test_a_point_whose_loss_is_not_finite_has_neither_loss_nor_accuracy(tmp_path):
    """Was: loss None but train accuracy 9.88 % (the share of class-0 targets: argmax of NaN logits is class
    0) at such a point, in the curve, the report's table and the plot."""
    settings = tiny_settings()
    sb, lb = _bn_model(0), _bn_model(1)
    with torch.no_grad():
        lb[-1].weight[0].fill_(3e38)  # finite, but every point but α = 0 overflows to non-finite outputs
    curve = parametric.curve(sb, lb, settings, "linear", alphas=[0.0, 0.5], progress=False)
    assert curve["train_loss"][0] is not None and curve["train_acc"][0] is not None
    for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
        assert curve[key][1] is None, key
    result = {"models": {"sb": "a", "lb": "b"}, "batchnorm": "eval", "curves": {"linear": curve}, "figures": {}}
    row = [line for line in parametric.render(result).splitlines() if line.startswith("| 0.5 ")][0]
    assert row.split("|")[2:6] == [" – "] * 4
    parametric.plot(result, tmp_path / "parametric.png")
