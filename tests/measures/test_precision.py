"""Every measure of a bfloat16 or float16 model against float32 on the very same (rounded) weights: each
agrees within a stated tolerance or is refused with the reason.

Tolerances (measured on this network, trained to a loss of 1.4e-4, in brackets): the Hessian measures and
relative flatness multiply in the model's dtype, so bfloat16 within 3 % (≤ 1.2 %), float16 within 1 %
(≤ 0.5 %); the Fisher–Rao norm within 4 % (2.0 %) and 1 % (0.1 %); the Gaussian measures run on a float32
copy of the model and agree to float32 rounding; PAC-Bayes searches σ on accuracies, which half precision
changes only at ties (equal on this network; 5 % allows one flipped prediction's worth of bisection). Before,
with the loss computed in half precision, the Gaussian measures came out as 0 (bfloat16) or 2× too large
(float16), the Fisher–Rao norm 0.35× and 1.5×, λmax 0.67× and 0.88×, relative flatness 0.51× and 0.71×.
"""

import copy

import pytest
import torch
from torch import nn

import hessgap
from hessgap.measures import DEFAULT_NAMES as NAMES
from hessgap.measures.rescale import NoSymmetry, rescaled_copy

from measure_models import fit

WORST_CASE = ["keskar", "keskar_subspace", "adaptive_linf", "adaptive_l2", "m_sharpness"]
HESSIAN = ["hessian_lmax", "hessian_trace", "scaled_lmax", "scaled_trace", "scaled_lmax_over_trace",
           "relative_flatness"]
TOLERANCE = {
    torch.bfloat16: {**dict.fromkeys(HESSIAN, 0.03), "fisher_rao": 0.04},
    torch.float16: {**dict.fromkeys(HESSIAN, 0.01), "fisher_rao": 0.01},
}
for _dtype in TOLERANCE:
    TOLERANCE[_dtype].update({"gaussian": 1e-6, "gaussian_adaptive": 1e-6, "pacbayes_flatness": 0.05,
                              "pacbayes_mag_flatness": 0.05})


@pytest.fixture(scope="module")
def trained():
    """A ReLU network near a minimum (float32), and its data."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the module's tests run on one thread (conftest), its training too
    torch.manual_seed(0)
    x = torch.randn(192, 12)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long() * 2
    data = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 192, 64)]
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    model = fit(model, data, steps=300, lr=1e-2)
    torch.set_num_threads(threads)
    return model, data


def _pair(trained, dtype):
    """The model in ``dtype`` and a float32 copy of its rounded weights, each with the data in its dtype."""
    model, data = trained
    low = copy.deepcopy(model).to(dtype)
    low_data = [(x.to(dtype), y) for x, y in data]
    return low, low_data, copy.deepcopy(low).float(), [(x.float(), y) for x, y in low_data]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_measure_agrees_with_float32_on_the_same_weights_or_is_refused(trained, dtype):
    low, low_data, full, full_data = _pair(trained, dtype)
    result = hessgap.measures(low, low_data, check_invariance=False)
    assert list(result.values) == list(NAMES)
    name = str(dtype).replace("torch.", "")
    for measure in WORST_CASE:
        assert result.values[measure] is None
        reason = result.not_applicable[measure]
        assert f"the model is {name}" in reason and "hessgap.measures(copy.deepcopy(model).float(), ...)" in reason
    agreeing = [measure for measure in NAMES if measure not in WORST_CASE]
    assert sorted(agreeing) == sorted(TOLERANCE[dtype])
    reference = hessgap.measures(full, full_data, agreeing, check_invariance=False)
    for measure in agreeing:
        expected = reference.values[measure]
        assert result.values[measure] == pytest.approx(expected, rel=TOLERANCE[dtype][measure]), measure
    assert "float32 copy" in result.notes["gaussian"][0]


def test_invariance_is_checked_in_bfloat16_as_in_float32(trained):
    low, low_data, full, full_data = _pair(trained, torch.bfloat16)
    names = ["gaussian", "gaussian_adaptive", "fisher_rao", "hessian_trace", "relative_flatness"]
    low_result = hessgap.measures(low, low_data, names)
    full_result = hessgap.measures(full, full_data, names)
    assert low_result.invariant == full_result.invariant
    assert low_result.invariant["gaussian_adaptive"] and not low_result.invariant["gaussian"]


def test_a_bfloat16_rescaling_that_changes_the_function_is_refused():
    """bfloat16's 1000 roundings are 8 times the outputs: a residual model's rescaling passed as exact."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(self.act(self.a(x)) + x)  # the skip adds the unscaled input

    torch.manual_seed(0)
    data = [(torch.randn(16, 6, dtype=torch.bfloat16), torch.randint(0, 3, (16,)))]
    with pytest.raises(NoSymmetry, match="not its data flow"):
        rescaled_copy(Residual().to(torch.bfloat16), data)
    plain = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).to(torch.bfloat16)
    assert rescaled_copy(plain, data)[2] < 0.05
