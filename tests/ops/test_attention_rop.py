"""The compiled attention ops against their plain-PyTorch twins (and the twins against autograd), opcheck,
argument checks, and the working set of the R-ops: linear in T, never a T×T matrix per direction."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from hessgap import _extension
from hessgap.ops import attention_rop as ops

pytestmark = pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-11, atol=1e-12)}


def make(dtype=torch.float64, B=2, H=3, Tq=37, Tk=37, D=8, Dv=6, K=3, mask=None, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype).to(device)

    q, k, v = r(B, H, Tq, D), r(B, H, Tk, D), r(B, H, Tk, Dv)
    bias = None
    if mask == "bool":
        keep = torch.rand(B, 1, Tq, Tk, generator=gen) > 0.3
        keep[0, 0, 1, :] = False  # a row whose every key is masked
        bias = torch.where(keep, 0.0, float("-inf")).to(dtype).to(device).expand(B, H, Tq, Tk)
    elif mask == "float":
        bias = r(1, H, Tq, Tk)
    tangents = [r(K, *t.shape) for t in (q, k, v)]
    return q, k, v, bias, tangents


def run_all(q, k, v, bias, tangents, causal, scale, impl):
    o, lse = impl["forward"](q, k, v, bias, causal, scale)
    g = torch.ones_like(o) * 0.3 + o
    grads = impl["backward"](q, k, v, bias, o, lse, g, causal, scale)
    ro, rho = impl["rforward"](q, k, v, bias, o, lse, *tangents, causal, scale)
    rg = torch.cos(ro)
    rgrads = impl["rbackward"](q, k, v, bias, o, lse, g, *tangents, ro, rho, rg, causal, scale)
    rgrads_no_rg = impl["rbackward"](q, k, v, bias, o, lse, g, *tangents, ro, rho, None, causal, scale)
    return (o, lse.nan_to_num(neginf=-1e30), *grads, ro, rho, *rgrads, *rgrads_no_rg)


KERNELS = {"forward": ops.attention_forward, "backward": ops.attention_backward, "rforward": ops.attention_rforward,
           "rbackward": ops.attention_rbackward}
TWINS = {"forward": ops.attention_forward_reference, "backward": ops.attention_backward_reference,
         "rforward": ops.attention_rforward_reference, "rbackward": ops.attention_rbackward_reference}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal,mask,tq,tk", [(False, None, 37, 37), (True, None, 70, 70), (False, "bool", 33, 130),
                                               (True, "float", 65, 65), (False, None, 1, 5)])
def test_kernels_match_twins(dtype, causal, mask, tq, tk):
    q, k, v, bias, tangents = make(dtype, Tq=tq, Tk=tk, mask=mask)
    got = run_all(q, k, v, bias, tangents, causal, 0.4, KERNELS)
    # the twin in float64 is the exact value the float32 kernel is judged against
    args64 = [t.double() if t is not None else None for t in (q, k, v, bias)]
    want = run_all(*args64, [t.double() for t in tangents], causal, 0.4, TWINS)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.to(dtype), **TOL[dtype])


def test_twins_are_the_derivatives_of_attention():
    """Independent check of the math: R-forward is autograd's jvp, R-backward the jvp of its vjp."""
    q, k, v, bias, (rq, rk, rv) = make(Tq=9, Tk=11, mask="float", K=1)
    scale = 0.3

    def attention(q, k, v):
        with sdpa_kernel([SDPBackend.MATH]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    o, lse = ops.attention_forward(q, k, v, bias, False, scale)
    torch.testing.assert_close(o, attention(q, k, v), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(o)
    _, tangent = torch.func.jvp(attention, (q, k, v), (rq[0], rk[0], rv[0]))
    ro, rho = ops.attention_rforward(q, k, v, bias, o, lse, rq, rk, rv, False, scale)
    torch.testing.assert_close(ro[0], tangent, rtol=1e-11, atol=1e-12)

    def grads(q, k, v, g):
        return torch.func.vjp(attention, q, k, v)[1](g)

    rg = torch.randn_like(ro)
    first, second = torch.func.jvp(grads, (q, k, v, g), (rq[0], rk[0], rv[0], rg[0]))
    for a, b in zip(ops.attention_backward(q, k, v, bias, o, lse, g, False, scale), first):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    for a, b in zip(ops.attention_rbackward(q, k, v, bias, o, lse, g, rq, rk, rv, ro, rho, rg, False, scale), second):
        torch.testing.assert_close(a[0], b, rtol=1e-11, atol=1e-12)


def test_fully_masked_rows_give_zeros():
    q, k, v, bias, tangents = make(Tq=4, Tk=4, mask="bool")
    o, lse = ops.attention_forward(q, k, v, bias, False, 0.5)
    assert torch.isneginf(lse[0, :, 1]).all() and (o[0, :, 1] == 0).all()
    ro, rho = ops.attention_rforward(q, k, v, bias, o, lse, *tangents, False, 0.5)
    assert torch.isfinite(ro).all() and (ro[:, 0, :, 1] == 0).all()


def test_opcheck():
    q, k, v, bias, tangents = make(torch.float32, B=1, H=2, Tq=5, Tk=5, K=2, mask="float")
    o, lse = ops.attention_forward(q, k, v, bias, True, 0.5)
    g = torch.randn_like(o)
    ro, rho = ops.attention_rforward(q, k, v, bias, o, lse, *tangents, True, 0.5)
    lib = torch.ops.hessgap
    torch.library.opcheck(lib.attention_forward.default, (q, k, v, bias, True, 0.5))
    torch.library.opcheck(lib.attention_backward.default, (q, k, v, bias, o, lse, g, True, 0.5))
    torch.library.opcheck(lib.attention_rforward.default, (q, k, v, None, o, lse, *tangents, True, 0.5))
    torch.library.opcheck(lib.attention_rbackward.default, (q, k, v, bias, o, lse, g, *tangents, ro, rho, None, True, 0.5))


def test_bad_arguments_raise_clear_errors():
    q, k, v, bias, (rq, rk, rv) = make(torch.float32, Tq=5, Tk=5)
    with pytest.raises(RuntimeError, match="q, k, v must be"):
        ops.attention_forward(q[0], k, v, None, False, 1.0)
    with pytest.raises(RuntimeError, match="attention bias must broadcast"):
        ops.attention_forward(q, k, v, torch.zeros(2, 3, 4, 5), False, 1.0)
    with pytest.raises(RuntimeError, match="convert boolean masks"):
        ops.attention_forward(q, k, v, torch.ones(2, 3, 5, 5, dtype=torch.bool), False, 1.0)
    o, lse = ops.attention_forward(q, k, v, None, False, 1.0)
    with pytest.raises(RuntimeError, match="rk must be"):
        ops.attention_rforward(q, k, v, None, o, lse, rq, rk[:2], rv, False, 1.0)


def _peak_allocation_bytes(fn):
    """The largest total of live CPU tensor bytes during ``fn`` beyond what existed before (profiler events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("seq", [128, 512])
def test_working_set_is_linear_in_the_sequence(seq):
    """Per direction the R-ops allocate their outputs and O(T) row statistics, never a T×T matrix: the math
    version allocates several (K, B, H, T, T) tensors."""
    K, B, H, D = 2, 1, 2, 16
    q, k, v, bias, tangents = make(torch.float32, B=B, H=H, Tq=seq, Tk=seq, D=D, Dv=D, K=K)
    o, lse = ops.attention_forward(q, k, v, None, True, 0.25)
    g = torch.randn_like(o)
    ro, rho = ops.attention_rforward(q, k, v, None, o, lse, *tangents, True, 0.25)
    outputs = 4 * (K * B * H * seq * D) * 4  # R{O} (+ ρ) forward; R{dQ}, R{dK}, R{dV} backward, float32
    contiguous_copies = 3 * 4 * B * H * seq * D
    fused = _peak_allocation_bytes(
        lambda: ops.attention_rbackward(q, k, v, None, o, lse, g, *tangents, ro, rho, None, True, 0.25))
    assert fused <= outputs + contiguous_copies + 64 * 1024
    math = _peak_allocation_bytes(
        lambda: ops.attention_rbackward_reference(q, k, v, None, o, lse, g, *tangents, ro, rho, None, True, 0.25))
    assert math >= K * B * H * seq * seq * 4  # at least one (K, B, H, T, T) float32 matrix


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal,mask,tq,tk,d", [(False, None, 37, 37, 8), (True, None, 130, 130, 64),
                                                 (False, "bool", 33, 130, 64), (True, "float", 65, 65, 128)])
def test_cuda_kernels_match_twins(dtype, causal, mask, tq, tk, d):
    if not _extension.cuda_kernels_built():
        pytest.skip("hessgap._C was built without CUDA kernels")
    q, k, v, bias, tangents = make(dtype, Tq=tq, Tk=tk, D=d, Dv=d, mask=mask, device="cuda")
    got = run_all(q, k, v, bias, tangents, causal, 0.4, KERNELS)
    args64 = [t.double().cpu() if t is not None else None for t in (q, k, v, bias)]
    want = run_all(*args64, [t.double().cpu() for t in tangents], causal, 0.4, TWINS)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b.to(dtype), **TOL[dtype])
    o, lse = ops.attention_forward(q, k, v, bias, causal, 0.4)
    torch.library.opcheck(torch.ops.hessgap.attention_rforward.default, (q, k, v, bias, o, lse, *tangents, causal, 0.4))


@pytest.mark.cuda
def test_cuda_working_set_is_linear_in_the_sequence():
    """Extra peak memory of the R-backward beyond its inputs and outputs grows linearly in T on CUDA."""
    if not _extension.cuda_kernels_built():
        pytest.skip("hessgap._C was built without CUDA kernels")
    extra = {}
    for seq in (1024, 4096):
        K, B, H, D = 4, 1, 4, 64
        q, k, v, bias, tangents = make(torch.float32, B=B, H=H, Tq=seq, Tk=seq, D=D, Dv=D, K=K, device="cuda")
        o, lse = ops.attention_forward(q, k, v, None, True, 0.125)
        g = torch.randn_like(o)
        ro, rho = ops.attention_rforward(q, k, v, None, o, lse, *tangents, True, 0.125)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = ops.attention_rbackward(q, k, v, None, o, lse, g, *tangents, ro, rho, None, True, 0.125)
        torch.cuda.synchronize()
        outputs = sum(t.numel() * t.element_size() for t in out)
        extra[seq] = torch.cuda.max_memory_allocated() - before - outputs
        assert extra[seq] <= K * B * H * seq * D * 4  # nothing T×T: at most one more tangent's worth
    assert extra[4096] <= 4 * extra[1024] + 1024 * 1024
