"""The local learning coefficient against models whose coefficient is known, the sampler's two paths and its
bookkeeping, the model left as it was, and the diagnostics catching runs to distrust.

Known answers (Watanabe 2009, "Algebraic geometry and statistical learning theory"; Aoyagi & Watanabe 2005,
"Stochastic complexities of reduced rank regression in Bayesian estimation"):

- linear regression with d parameters: regular, λ = d/2;
- y = w²·x at the true w = 0: K(w) ∝ w⁴, λ = 1/4 (multiplicity 1). The tempered posterior exp(−nβ·w⁴) is
  proper without localization and E[nβ·w⁴] = 1/4 exactly at every n (Γ-integral), so the estimator's target
  is 1/4 itself;
- y = a·b·x at a = b = 0: reduced-rank regression with M = N = H = 1, r = 0: λ = 1/2 with multiplicity 2,
  approached like 1/2 − O(1/log nβ); the localized target at finite n and γ is a one-dimensional integral
  (:func:`ab_target`), against which SGLD is compared.

Data are built so that L_n(w) = L_n(w*) + K(w) exactly: inputs scaled to mean square 1 and noise
orthogonal to them, so the sample minimizer is the true parameter.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import integrate
from torch import nn

import hessgap
from hessgap.errors import HessgapError
from hessgap.measures.llc_checks import split_rhat

from oracles import assert_unchanged, snapshot


def regression(n=5000, d=10, noise=0.5, batch=250, seed=0):
    """A least-squares fit of d weights: the model at the exact minimizer and its loader's batches."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    y = x @ torch.randn(d, generator=generator) + noise * torch.randn(n, generator=generator)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x.double(), y.double()[:, None]).solution.T.float())
    return model, [(x[i:i + batch], y[i:i + batch, None]) for i in range(0, n, batch)]


def orthogonal_data(n, seed=0):
    """x with mean square 1 and noise y orthogonal to x: L_n(c·x) = mean(y²) + c² for the MSE loss."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    x = x / x.square().mean().sqrt()
    y = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    return [(x, y - x * (x * y).sum() / (x * x).sum())]


class Quartic(nn.Module):
    """y = w²·x, at w = 0."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        return self.w ** 2 * x


class Product(nn.Module):
    """y = a·b·x, at a = b = 0."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        return self.a * self.b * x


def ab_target(t, gamma):
    """t·E[a²b²] under exp(−t·a²b² − γ(a² + b²)/2): the Gaussian integral over b in closed form, then over a
    by quadrature."""
    def c(a):
        return t * a * a + gamma / 2

    def weight(a):
        return math.exp(-gamma * a * a / 2) / math.sqrt(c(a))

    num = integrate.quad(lambda a: weight(a) * t * a * a / (2 * c(a)), 0, math.inf, limit=500, epsrel=1e-12)[0]
    return num / integrate.quad(weight, 0, math.inf, limit=500, epsrel=1e-12)[0]


def test_ab_target_matches_a_two_dimensional_quadrature():
    t, gamma = 500.0, 10.0
    def density(b, a, k):
        return (t * a * a * b * b) ** k * math.exp(-t * a * a * b * b - gamma * (a * a + b * b) / 2)
    num = integrate.dblquad(lambda b, a: density(b, a, 1), -4, 4, -4, 4, epsabs=1e-12)[0]
    den = integrate.dblquad(lambda b, a: density(b, a, 0), -4, 4, -4, 4, epsabs=1e-12)[0]
    assert ab_target(t, gamma) == pytest.approx(num / den, rel=1e-6)


@pytest.fixture(scope="module")
def regression_result():
    model, data = regression()
    return hessgap.llc(model, data, loss_fn=F.mse_loss)


def test_linear_regression_gives_d_over_2_with_the_default_settings(regression_result):
    """d = 10, n = 5000, batches of 250, no setting chosen: λ̂ within 25 % of 5 and within 3 standard errors."""
    r = regression_result
    assert r.value == pytest.approx(5.0, rel=0.25)
    assert abs(r.value - 5.0) < 3 * r.stderr, (r.value, r.stderr)
    assert r.n_beta == pytest.approx(5000 / math.log(5000))
    assert r.trustworthy, r.diagnostics
    assert r.path == "vmap" and len(r.per_chain) == 4 and len(r.traces[0]) == 300


def test_singular_quartic_model_gives_one_quarter():
    """y = w²x at w = 0, where the Hessian vanishes: λ = 1/4 (not the regular 1/2)."""
    r = hessgap.llc(Quartic(), orthogonal_data(2000), loss_fn=F.mse_loss, step_size=4e-4, localization=0.0,
                    chains=8, draws=1500, burn_in=200, seed=1)
    assert abs(r.value - 0.25) < 3 * r.stderr, (r.value, r.stderr)
    assert r.value == pytest.approx(0.25, rel=0.3)
    assert r.lmax == pytest.approx(0.0, abs=1e-9)


def test_singular_product_model_matches_its_localized_target_below_the_regular_value():
    """y = a·b·x at a = b = 0: λ = 1/2 (multiplicity 2), far below the regular 1 of two parameters; at this
    n and γ the estimator's exact target is ab_target (0.38 for n = 2000, γ = 1)."""
    n, gamma = 2000, 1.0
    r = hessgap.llc(Product(), orthogonal_data(n), loss_fn=F.mse_loss, step_size=1e-3, localization=gamma,
                    chains=8, draws=1500, burn_in=300, seed=2)
    target = ab_target(n / math.log(n), gamma)
    assert abs(r.value - target) < 3 * r.stderr, (r.value, r.stderr, target)
    assert r.value < 0.5 < 1.0


def test_auto_settings_refuse_a_point_without_curvature():
    with pytest.raises(HessgapError, match="top eigenvalue at w\\* is .*pass step_size= and localization="):
        hessgap.llc(Quartic(), orthogonal_data(200), loss_fn=F.mse_loss, draws=5, burn_in=0)


def test_the_vmapped_and_the_looped_chains_are_the_same_chains():
    model, data = regression(n=400, d=3, batch=100)
    settings = dict(loss_fn=F.mse_loss, step_size=1e-4, localization=1.0, n_beta=50.0, chains=3, draws=20,
                    burn_in=5, diagnose=False)
    batched = hessgap.llc(model, data, **settings)
    looped = hessgap.llc(model, data, vectorize=False, **settings)
    assert (batched.path, looped.path) == ("vmap", "loop")
    torch.testing.assert_close(torch.tensor(batched.loss_traces), torch.tensor(looped.loss_traces), rtol=1e-5,
                               atol=1e-7)
    again = hessgap.llc(model, data, **settings)
    assert again.per_chain == batched.per_chain  # seeded: the same chains again
    other = hessgap.llc(model, data, seed=1, **settings)
    assert other.per_chain != batched.per_chain


def test_a_model_that_does_not_vmap_falls_back_to_the_loop_and_says_why():
    class DataDependent(nn.Linear):
        def forward(self, x):
            out = super().forward(x)
            return out if float(out.detach().abs().max()) < 1e6 else out * 0  # .item() inside: no vmap

    model, data = regression(n=200, d=3, batch=100)
    odd = DataDependent(3, 1, bias=False)
    odd.load_state_dict(model.state_dict())
    r = hessgap.llc(odd, data, loss_fn=F.mse_loss, step_size=1e-4, localization=1.0, chains=2, draws=5, burn_in=0,
                    diagnose=False)
    assert r.path == "loop" and any("does not vmap" in note for note in r.notes)


def test_the_estimate_is_the_unit_weighted_mean_of_the_traces_after_burn_in():
    """Unequal batches (100, 100 and 37 samples) weigh by their units; the burn-in is left out."""
    model, data = regression(n=237, d=2, batch=100)
    r = hessgap.llc(model, data, loss_fn=F.mse_loss, step_size=1e-4, localization=1.0, n_beta=40.0, chains=2,
                    draws=12, burn_in=3, diagnose=False)
    traces = torch.tensor(r.traces, dtype=torch.float64)[:, 3:]
    weights = torch.tensor(r.step_units, dtype=torch.float64)
    assert set(r.step_units) == {100.0, 37.0} and len(r.step_units) == 15
    expected = (traces * weights[3:]).sum(1) / weights[3:].sum()
    torch.testing.assert_close(torch.tensor(r.per_chain, dtype=torch.float64), expected, rtol=1e-5, atol=1e-7)
    assert r.per_chain[0] != pytest.approx(float(traces[0].mean()), rel=1e-6)  # not the plain mean


def test_dict_batches_with_token_weights_and_the_model_left_as_it_was():
    """A Hugging Face causal LM on padded token batches: the loss is the model's own, each batch weighs its
    counted tokens; parameters, buffers, modes and grads come back bit for bit."""
    pytest.importorskip("transformers")
    from oracles import counted_tokens, tiny_hf, token_batches

    model = tiny_hf("gpt2", dtype=torch.float32)
    model.train()
    for p in list(model.parameters())[::3]:
        p.grad = torch.randn_like(p)
    snap = snapshot(model)
    batches = token_batches(causal=True)
    r = hessgap.llc(model, batches, step_size=1e-5, localization=10.0, chains=2, draws=6, burn_in=2, diagnose=False)
    assert_unchanged(model, snap)
    assert math.isfinite(r.value) and r.units == counted_tokens(batches, causal=True)
    assert set(r.step_units) == {float(counted_tokens([b], causal=True)) for b in batches}


def test_diagnostics_flag_a_step_too_large_and_suggest_a_smaller_one():
    model, data = regression(n=1000, d=4, batch=250)
    r = hessgap.llc(model, data, loss_fn=F.mse_loss, step_size=5e-3, localization=1.0, chains=2, draws=40, burn_in=10)
    flagged = {c["check"] for c in r.diagnostics if not c["ok"]}
    assert "step_size" in flagged and not r.trustworthy
    assert r.suggested["step_size"] < 5e-3
    fine = hessgap.llc(model, data, loss_fn=F.mse_loss, step_size=r.suggested["step_size"], localization=1.0,
                       chains=2, draws=40, burn_in=10)
    assert "step_size" not in {c["check"] for c in fine.diagnostics if not c["ok"]}


def test_diagnostics_flag_chains_that_fall_below_the_loss_at_a_point_that_is_not_a_minimum():
    model, data = regression(n=1000, d=4, batch=250)
    with torch.no_grad():
        model.weight.add_(0.5)  # far from the least-squares weights: the chains slide downhill
    r = hessgap.llc(model, data, loss_fn=F.mse_loss, chains=2, draws=40, burn_in=10)
    below = next(c for c in r.diagnostics if c["check"] == "below_minimum")
    assert not below["ok"] and "not a local minimum" in below["message"] and r.value < 0


def test_diagnostics_flag_traces_that_have_not_settled():
    """Steps so small that the chains are still climbing from w* at the end: the halves differ."""
    model, data = regression(n=1000, d=4, batch=1000)
    r = hessgap.llc(model, data, loss_fn=F.mse_loss, step_size=1e-7, localization=0.0, chains=4, draws=200,
                    burn_in=0)
    settled = next(c for c in r.diagnostics if c["check"] == "settled")
    assert not settled["ok"] and r.suggested["draws"] == 400


def test_diverged_chains_make_the_llc_refused_with_a_suggestion():
    model, data = regression(n=1000, d=4, batch=250)
    with pytest.raises(HessgapError, match="every chain diverged.*try step_size="):
        hessgap.llc(model, data, loss_fn=F.mse_loss, step_size=10.0, localization=1.0, chains=2, draws=20,
                    burn_in=0)


def test_split_rhat_of_agreeing_and_disagreeing_chains():
    generator = torch.Generator().manual_seed(0)
    same = torch.randn(4, 400, generator=generator, dtype=torch.float64)
    assert split_rhat(same) == pytest.approx(1.0, abs=0.02)
    shifted = same + torch.tensor([0.0, 0.0, 3.0, 3.0], dtype=torch.float64)[:, None]
    assert split_rhat(shifted) > 1.5


@pytest.mark.parametrize("settings, message", [
    ({"step_size": 0}, "step_size must be a finite number > 0"),
    ({"step_size": "fast"}, "step_size must be a finite number > 0"),
    ({"localization": -1.0}, "localization must be"),
    ({"chains": 0}, "chains must be"),
    ({"draws": 2.5}, "draws must be"),
    ({"burn_in": -1}, "burn_in must be"),
    ({"n_beta": float("inf")}, "n_beta must be a finite number > 0"),
    ({"steps": 10}, "has no setting 'steps'"),
])
def test_bad_settings_are_refused_saying_what_to_pass(settings, message):
    model, data = regression(n=100, d=2, batch=50)
    with pytest.raises(HessgapError, match=message):
        hessgap.llc(model, data, loss_fn=F.mse_loss, **settings)


def test_result_json_and_the_traces_plot(regression_result, tmp_path):
    r = regression_result
    assert "LLC " in str(r) and "LLCResult(" in repr(r)
    again = hessgap.LLCResult(**r.to_dict())
    assert again.value == r.value
    path = r.plot(tmp_path / "llc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_llc_among_the_measures_and_not_taken_by_default():
    model, data = regression(n=300, d=3, batch=100)
    result = hessgap.measures(model, data, ["llc", "hessian_lmax"], loss_fn=F.mse_loss,
                              options={"llc": {"draws": 30, "burn_in": 10}}, check_invariance=False)
    assert result.values["llc"] is not None and result.stderr["llc"] > 0
    assert result.details["llc"]["lmax"] == pytest.approx(result.values["hessian_lmax"])  # one Lanczos, shared
    assert "llc" not in hessgap.measures.DEFAULT_NAMES and "llc" in hessgap.measures.NAMES


def test_half_precision_models_are_sampled_on_a_float32_copy():
    model, data = regression(n=400, d=3, batch=100)
    low = [(x.bfloat16(), y.bfloat16()) for x, y in data]
    settings = dict(loss_fn=F.mse_loss, step_size=1e-4, localization=1.0, chains=2, draws=10, burn_in=0,
                    diagnose=False)
    half = hessgap.llc(_bf16(model), low, **settings)
    full = hessgap.llc(_bf16(model).float(), [(x.float(), y.float()) for x, y in low], **settings)
    assert half.per_chain == pytest.approx(full.per_chain, rel=1e-6)
    assert any("float32 copy" in note for note in half.notes)


def _bf16(model):
    import copy

    return copy.deepcopy(model).bfloat16()
