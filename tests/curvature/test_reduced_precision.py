"""bfloat16 and float16 models: products in the model's dtype, sums and vectors in float32, dtypes stated,
results within a stated tolerance of the same (rounded) weights in float32.

Tolerances: a bfloat16 product carries about 2⁻⁸ relative rounding per operation, so H·v of these small
models comes within 2 % of float32 (measured 0.6–0.9 %), float16 within 0.3 % (measured 0.07–0.12 %);
eigenvalues within 2 % of ‖H‖ for bfloat16.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import hessgap
from hessgap.curvature.objective import LossOverData
from hessgap.errors import HessgapError

from oracles import assert_unchanged, snapshot, tiny_hf, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")
HALF = (torch.bfloat16, torch.float16)
HVP_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))


def mlp_data():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)) for _ in range(2)]


def gpt2():
    pytest.importorskip("transformers")
    return tiny_hf("gpt2", torch.float32)


CASES = {"mlp": (mlp, mlp_data), "gpt2": (gpt2, lambda: token_batches(causal=True))}
#: Blocks compared (a few of GPT-2's 15, to keep the test short): GPT-2's indefinite MLP output block
#: once converged at once in bfloat16 on a Ritz value of the wrong end.
BLOCKS = {"mlp": "module", "gpt2": ["transformer.wte", "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_proj"]}


def pair(name, dtype):
    """The model in ``dtype`` and a float32 copy of the very same (rounded) weights, with the data."""
    build, data = CASES[name]
    low = build().to(dtype)
    return low, copy.deepcopy(low).float(), data()


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_every_call_runs_in_half_precision_and_states_its_dtypes(name, dtype):
    low, _, data = pair(name, dtype)
    model_dtype = str(dtype).replace("torch.", "")
    n = sum(p.numel() for p in low.parameters())
    before = snapshot(low)
    result = hessgap.hvp(low, data, torch.randn(3, n), return_info=True)
    assert result.value.dtype == torch.float32
    assert (result.dtype, result.accumulation_dtype) == (model_dtype, "float32")
    op = hessgap.HessianOperator(low, data)
    assert (op.dtype, op.model_dtype) == (torch.float32, dtype)
    assert op.matmat(torch.randn(2, n)).dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = [hessgap.eigenvalues(low, data, k=2), hessgap.trace(low, data, num_probes=4),
                   hessgap.density(low, data, lanczos_steps=8),
                   hessgap.block_spectrum(low, data, blocks=BLOCKS[name], max_iter=10, num_probes=2)]
    for r in results:
        assert (r.dtype, r.model_dtype) == ("float32", model_dtype)
        assert r.to_dict()["model_dtype"] == model_dtype
    assert results[0].eigenvectors.dtype == torch.float32
    assert_unchanged(low, before)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_products_are_within_the_stated_tolerance_of_float32(name, dtype):
    low, full, data = pair(name, dtype)
    V = torch.randn(8, sum(p.numel() for p in full.parameters()))
    assert rel(hessgap.hvp(low, data, V), hessgap.hvp(full, data, V)) < HVP_TOLERANCE[dtype]


@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_spectra_are_within_the_stated_tolerance_and_converge_as_fast(name):
    low, full, data = pair(name, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lanczos must converge: no "stopped without reaching tol" warning
        top_low = hessgap.eigenvalues(low, data, k=3)
    top_full = hessgap.eigenvalues(full, data, k=3)
    # the products' rounding stops the residuals at about 2⁻⁹·‖H‖; Lanczos stops there, not at max_iter
    assert top_low.converged and top_low.iterations <= 2 * top_full.iterations
    norm = abs(top_full.eigenvalues[0])
    assert max(abs(a - b) for a, b in zip(top_low.eigenvalues, top_full.eigenvalues)) < 2e-2 * norm
    blocks_low = hessgap.block_spectrum(low, data, blocks=BLOCKS[name], k=1, num_probes=0)
    blocks_full = hessgap.block_spectrum(full, data, blocks=BLOCKS[name], k=1, num_probes=0)
    assert all(blocks_low.converged)
    for a, b in zip(blocks_low.eigenvalues, blocks_full.eigenvalues):
        assert abs(a[0] - b[0]) < 2e-2 * max(abs(b[0]), 1e-3 * norm)
    t_low = hessgap.trace(low, data, num_probes=16)
    t_full = hessgap.trace(full, data, num_probes=16)  # the same probes
    assert abs(t_low.value - t_full.value) < 2e-2 * sum(abs(e) for e in t_full.estimates) / 16


def test_float16_weights_scale_the_sums_not_the_loss():
    """A float16 loss times a batch's count of 10⁵ units overflowed float16 (max 65504)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).half()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(2)]
    V = torch.randn(2, 8)
    plain = hessgap.hvp(model, data, V, loss_fn=nn.MSELoss())
    heavy = hessgap.hvp(model, data, V, loss_fn=nn.MSELoss(), weight_fn=lambda batch: 1e5)
    torch.testing.assert_close(heavy, plain)
    value, grads = LossOverData(model, data, nn.MSELoss(), weight_fn=lambda batch: 1e5).value_and_grad()
    plain_value, plain_grads = LossOverData(model, data, nn.MSELoss()).value_and_grad()
    assert value == pytest.approx(plain_value, rel=1e-3)
    for g, h in zip(grads, plain_grads):
        torch.testing.assert_close(g, h)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_sharpness_refuses_half_precision_and_says_why(dtype):
    model = mlp().to(dtype)
    with pytest.raises(HessgapError, match=rf"below what {dtype} resolves .* measure a float32 copy"):
        hessgap.sharpness(model, mlp_data())
    with pytest.raises(HessgapError, match="float32 copy"):
        hessgap.adaptive_sharpness(model, mlp_data())
