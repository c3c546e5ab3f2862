"""The fused LM head + cross-entropy kernels against their plain-PyTorch twins (whole-vocabulary and chunked
sweeps), the twins against autograd of F.cross_entropy(h Wᵀ + b) (gradient, and jvp of the gradient),
low-precision inputs, the chunk chooser, opcheck and the argument checks."""

import pytest
import torch
import torch.nn.functional as F

from hessgap import _extension
from hessgap.errors import HessgapError
from hessgap.ops import linear_ce_rop as ops

pytestmark = pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-11, atol=1e-12)}


def problem(n=13, d=6, vocab=23, k=3, bias=True, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype)

    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::4] = -100
    labels, weights = ops.token_weights(labels, dtype=ops.accumulation_dtype(dtype))
    return dict(h=rand(n, d), weight=rand(vocab, d), bias=rand(vocab) if bias else None, labels=labels,
                weights=weights), dict(dh=rand(k, n, d), dweight=rand(k, vocab, d), dbias=rand(k, vocab) if bias else None)


def args(p):
    return p["h"], p["weight"], p["bias"], p["labels"], p["weights"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunks", [(0, 0), (4, 0), (5, 7), (1, 1), (64, 10)])
def test_kernels_match_twins(dtype, bias, chunks):
    p, t = problem(bias=bias, dtype=torch.float64)
    want = ops.linear_ce_forward_reference(*args(p))
    cast = {key: (v.to(dtype) if v is not None and v.is_floating_point() else v) for key, v in p.items()}
    cast["weights"] = p["weights"].to(ops.accumulation_dtype(dtype))
    got = ops.linear_ce_forward(*args(cast), *chunks)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype), **TOL[dtype])
    for drop in (None, "dh", "dweight", "dbias"):
        tangents = {key: (None if key == drop or v is None else v) for key, v in t.items()}
        if all(v is None for v in tangents.values()):
            continue
        want_r = ops.linear_ce_rgrad_reference(*args(p), want[1], **tangents)
        low = {key: (v.to(dtype) if v is not None else None) for key, v in tangents.items()}
        got_r = ops.linear_ce_rgrad(*args(cast), got[1], *low.values(), *chunks)
        for g, w in zip(got_r, want_r):
            torch.testing.assert_close(g, w.to(g.dtype), **TOL[dtype])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_twins_are_the_derivatives_of_cross_entropy(reduction):
    """Loss and gradients are autograd's of F.cross_entropy(h Wᵀ + b) (ignore_index −100); the R-gradients are
    the jvp of (h, W, b) ↦ ∇L along each direction, R{L} the jvp of L."""
    gen = torch.Generator().manual_seed(3)
    n, d, vocab, k = 11, 5, 17, 2
    h, weight, bias = (torch.randn(*s, dtype=torch.float64, generator=gen) for s in ((n, d), (vocab, d), (vocab,)))
    raw = torch.randint(0, vocab, (n,), generator=gen)
    raw[[1, 6]] = -100
    labels, weights = ops.token_weights(raw, reduction=reduction, dtype=torch.float64)

    def loss(h, weight, bias):
        return F.cross_entropy(h @ weight.T + bias, raw, ignore_index=-100, reduction=reduction)

    value, lse, gh, gw, gb = ops.linear_ce_forward_reference(h, weight, bias, labels, weights)
    torch.testing.assert_close(value, loss(h, weight, bias), rtol=1e-13, atol=1e-14)
    for got, want in zip((gh, gw, gb), torch.func.grad(loss, argnums=(0, 1, 2))(h, weight, bias)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    dh, dw, db = (torch.randn(k, *s, dtype=torch.float64, generator=gen) for s in ((n, d), (vocab, d), (vocab,)))
    rloss, rgh, rgw, rgb = ops.linear_ce_rgrad_reference(h, weight, bias, labels, weights, lse, dh, dw, db)
    grad = torch.func.grad(loss, argnums=(0, 1, 2))
    for i in range(k):
        _, r_value = torch.func.jvp(loss, (h, weight, bias), (dh[i], dw[i], db[i]))
        _, r_grad = torch.func.jvp(grad, (h, weight, bias), (dh[i], dw[i], db[i]))
        torch.testing.assert_close(rloss[i], r_value, rtol=1e-12, atol=1e-13)
        for got, want in zip((rgh[i], rgw[i], rgb[i]), r_grad):
            torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    """Half-precision tokens and weights: loss and lse in float32, gradients in the inputs' dtype, close to the
    float32 result of the same (rounded) inputs."""
    p, t = problem(dtype=dtype, vocab=40)
    p["weights"] = p["weights"].float()
    loss, lse, gh, gw, gb = ops.linear_ce_forward(*args(p), 4, 16)
    assert loss.dtype == lse.dtype == torch.float32 and gh.dtype == gw.dtype == gb.dtype == dtype
    full = {key: (v.float() if v is not None and v.is_floating_point() else v) for key, v in p.items()}
    want = ops.linear_ce_forward_reference(*args(full))
    torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.float(), want[3], rtol=2e-2, atol=1e-2)
    rloss, rgh, rgw, rgb = ops.linear_ce_rgrad(*args(p), lse, *t.values(), 4, 16)
    assert rloss.dtype == torch.float32 and rgh.dtype == rgw.dtype == dtype
    want_r = ops.linear_ce_rgrad_reference(*args(full), want[1], *(v.float() for v in t.values()))
    torch.testing.assert_close(rgw.float(), want_r[2], rtol=2e-2, atol=2e-2)


def test_choose_chunks_fits_the_budget():
    tokens, vocab, k = 2048, 128_000, 4
    whole = ops.choose_chunks(tokens, vocab, k, 4, budget=2**40)
    assert whole == (tokens, vocab)
    token_chunk, vocab_chunk = ops.choose_chunks(tokens, vocab, k, 4, budget=2**30)
    assert vocab_chunk == vocab and token_chunk * vocab * (2 * k + 4) * 4 <= 2**30
    token_chunk, vocab_chunk = ops.choose_chunks(tokens, vocab, k, 4, budget=2**24)
    assert token_chunk == 128 and vocab_chunk < vocab and vocab_chunk % 256 == 0
    assert token_chunk * vocab_chunk * (2 * k + 4) * 4 <= 2**24


def test_token_weights_mean_over_counted_tokens():
    labels, weights = ops.token_weights(torch.tensor([3, -100, 1, 2]))
    assert labels.tolist() == [3, 0, 1, 2]
    torch.testing.assert_close(weights, torch.tensor([1 / 3, 0, 1 / 3, 1 / 3]))
    with pytest.raises(HessgapError, match="reduction"):
        ops.token_weights(labels, reduction="none")


def test_opcheck():
    p, t = problem(n=6, d=4, vocab=9, k=2, dtype=torch.float32)
    torch.library.opcheck(torch.ops.hessgap.linear_ce_forward.default, (*args(p), 4, 5))
    lse = ops.linear_ce_forward(*args(p))[1]
    torch.library.opcheck(torch.ops.hessgap.linear_ce_rgrad.default, (*args(p), lse, *t.values(), 4, 5))
    torch.library.opcheck(torch.ops.hessgap.linear_ce_rgrad.default, (*args(p), lse, None, t["dweight"], None, 0, 0))


def test_bad_arguments_raise_clear_errors():
    p, t = problem(dtype=torch.float32)
    h, weight, bias, labels, weights = args(p)
    with pytest.raises(RuntimeError, match=r"weight must be \(vocabulary, d\)"):
        ops.linear_ce_forward(h, weight[:, :3], bias, labels, weights)
    with pytest.raises(RuntimeError, match=r"labels must be \(tokens,\)"):
        ops.linear_ce_forward(h, weight, bias, labels[:3], weights)
    with pytest.raises(RuntimeError, match="integer class indices"):
        ops.linear_ce_forward(h, weight, bias, labels.float(), weights)
    with pytest.raises(RuntimeError, match="outside"):
        ops.linear_ce_forward(h, weight, bias, labels + 100, weights)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.linear_ce_forward(h, weight.double(), bias, labels, weights)
    lse = ops.linear_ce_forward(h, weight, bias, labels, weights)[1]
    with pytest.raises(RuntimeError, match="at least one of"):
        ops.linear_ce_rgrad(h, weight, bias, labels, weights, lse, None, None, None)
    with pytest.raises(RuntimeError, match=r"dweight must be \(k, vocabulary, d\)"):
        ops.linear_ce_rgrad(h, weight, bias, labels, weights, lse, t["dh"], t["dweight"][:, :4], None)


@pytest.mark.cuda
@pytest.mark.parametrize("chunks", [(0, 0), (5, 7)])
def test_cuda_kernels_match_cpu(chunks):
    if not _extension.cuda_kernels_built():
        pytest.skip("hessgap._C was built without CUDA kernels")
    p, t = problem(dtype=torch.float32, vocab=300, n=40)
    cpu_f = ops.linear_ce_forward(*args(p), *chunks)
    cpu_r = ops.linear_ce_rgrad(*args(p), cpu_f[1], *t.values(), *chunks)
    cuda = {key: (v.cuda() if v is not None else None) for key, v in p.items()}
    cuda_t = [v.cuda() for v in t.values()]
    got_f = ops.linear_ce_forward(*args(cuda), *chunks)
    got_r = ops.linear_ce_rgrad(*args(cuda), got_f[1], *cuda_t, *chunks)
    for g, w in zip(got_f + got_r, cpu_f + cpu_r):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-5)
