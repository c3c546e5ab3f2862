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
from hessgap.curvature.graph import GraphPlan
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


def llama():
    """A two-layer Llama (RMSNorm, rotary positions, SwiGLU, causal attention) from a random init."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=23, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


CASES = {"mlp": (mlp, mlp_data), "gpt2": (gpt2, lambda: token_batches(causal=True)),
         "llama": (llama, lambda: token_batches(causal=True))}
#: Blocks compared (a few of GPT-2's 15, to keep the test short): GPT-2's indefinite MLP output block
#: once converged at once in bfloat16 on a Ritz value of the wrong end.
BLOCKS = {"mlp": "module", "gpt2": ["transformer.wte", "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_proj"],
          "llama": ["model.embed_tokens", "model.layers.0.mlp.down_proj"]}


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


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_half_precision_models_run_on_the_graph_engine(name, dtype):
    """bfloat16/float16 models left the fused path ("the fused kernels take float32 and float64"): their
    products now run on the graph engine in the model's dtype, the kernels' reductions in float32."""
    low, full, data = pair(name, dtype)
    V = torch.randn(4, sum(p.numel() for p in full.parameters()))
    result = hessgap.hvp(low, data, V, return_info=True)
    assert (result.path, result.fallback_reason) == ("fused", None)
    op = hessgap.HessianOperator(low, data)
    assert isinstance(op._engine._plan, GraphPlan)
    assert rel(result.value, hessgap.hvp(full, data, V)) < HVP_TOLERANCE[dtype]
    generic = hessgap.hvp(low, data, V, path="generic")
    assert rel(result.value, generic) < 2 * HVP_TOLERANCE[dtype]


def test_bfloat16_top5_eigenvalues_are_within_1e_2_of_float32_on_the_graph_engine():
    """The Llama's top five (30.2, 17.7, 16.5, 14.6, 13.8 in float32) are separated by more than bfloat16's
    rounding of the products (~0.6 % of ‖H·v‖): each within 1e-2 relative of float32 (measured ≤ 0.4 %)."""
    low, full, data = pair("llama", torch.bfloat16)
    top_low = hessgap.eigenvalues(low, data, k=5)
    top_full = hessgap.eigenvalues(full, data, k=5)
    assert top_low.path == "fused" and top_low.converged
    for a, b in zip(top_low.eigenvalues, top_full.eigenvalues):
        assert abs(a - b) < 1e-2 * abs(b)


def confident_mlp():
    """An MLP near a minimum: the median softmax top probability is 0.997 (1.0 once rounded to bfloat16)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(64, 4)
    with torch.no_grad():
        model[2].weight.mul_(60)
        y = model(x).argmax(1)
    return model, [(x, y)]


@pytest.mark.parametrize("path", ["auto", "generic"])
def test_cross_entropy_is_taken_from_float32_logits(path):
    """The loss took bfloat16 logits (a softmax of 0.999 is 1 there, and the loss carried 3 digits); softmax
    and loss now run on float32 logits on both paths: the loss is float32's on the same logits."""
    model, data = confident_mlp()
    low = model.to(torch.bfloat16)
    V = torch.randn(2, sum(p.numel() for p in low.parameters()))
    result = hessgap.hvp(low, data, V, path=path, return_info=True)
    assert result.path == ("fused" if path == "auto" else "generic")
    x, y = data[0]
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(low(x.to(torch.bfloat16)).float(), y))
    # the fused LM head forms the logits from bfloat16 inputs with float32 accumulation, never rounding them
    # to bfloat16 as the model's own Linear does: it agrees to the logits' rounding, not to float32's
    assert result.loss == pytest.approx(expected, rel=1e-5 if path == "generic" else 1e-2)
    assert abs(result.loss - float(nn.functional.cross_entropy(low(x.to(torch.bfloat16)), y))) > 0
