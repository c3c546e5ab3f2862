"""The BLAS path of the attention R-ops (score tiles) against the streaming kernels and the float64 twins, its tile
plan and memory budget, and which path the wrappers take."""

import pytest
import torch

from hessgap import _extension
from hessgap.ops import attention_rop as ops
from hessgap.ops import attention_tiles as tiles

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")]

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-11, atol=1e-12)}


def make(dtype, B=2, H=4, Tq=37, Tk=37, D=8, Dv=6, K=3, mask=None, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype)

    q, k, v = r(B, H, Tq, D), r(B, H, Tk, D), r(B, H, Tk, Dv)
    bias = None
    if mask == "padding":  # Hugging Face's padding: the last row's last third of keys masked, (B, 1, 1, Tk)
        keep = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
        keep[-1, ..., Tk - Tk // 3:] = False
        bias = torch.where(keep, 0.0, float("-inf")).to(dtype).expand(B, H, Tq, Tk)
    elif mask == "causal+padding":  # what Hugging Face decoders pass with an attention mask (is_causal=False)
        keep = torch.ones(B, 1, Tq, Tk, dtype=torch.bool).tril()
        keep[-1, ..., Tk - Tk // 3:] = False
        bias = torch.where(keep, 0.0, float("-inf")).to(dtype).expand(B, H, Tq, Tk)
    elif mask == "bool":
        keep = torch.rand(B, 1, Tq, Tk, generator=gen) > 0.3
        keep[0, 0, 1, :] = False  # a row whose every key is masked
        bias = torch.where(keep, 0.0, float("-inf")).to(dtype).expand(B, H, Tq, Tk)
    elif mask == "float":
        bias = r(1, H, Tq, Tk)
    tangents = [r(K, *t.shape) for t in (q, k, v)]
    return q, k, v, bias, tangents


def r_ops(q, k, v, bias, tangents, causal, scale, rforward, rbackward):
    o, lse = ops.attention_forward(q, k, v, bias, causal, scale)
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(o.shape, dtype=torch.float64, generator=gen).to(q.dtype)
    ro, rho = rforward(q, k, v, bias, o, lse, *tangents)
    rg = torch.cos(ro)
    with_rg = rbackward(q, k, v, bias, o, lse, g, *tangents, ro, rho, rg)
    without_rg = rbackward(q, k, v, bias, o, lse, g, *tangents, ro, rho, None)
    return (ro, rho, *with_rg, *without_rg)


def by_tiles(cut, causal, scale):
    return (lambda *a: tiles.rforward(*a, causal, scale, cut), lambda *a: tiles.rbackward(*a, causal, scale, cut))


def by_kernel(causal, scale):
    return (lambda *a: ops.attention_rforward(*a, causal, scale), lambda *a: ops.attention_rbackward(*a, causal, scale))


def by_twin(causal, scale):
    return (lambda *a: ops.attention_rforward_reference(*a, causal, scale),
            lambda *a: ops.attention_rbackward_reference(*a, causal, scale))


#: the default plan (one tile here), tiles of two of a batch's four heads × 7 queries, tiles of two whole batches
CUTS = {"default": None, "many tiles": tiles.Plan(heads=2, block=7), "two batches": tiles.Plan(heads=8, block=64)}


@pytest.mark.parametrize("cut", list(CUTS))
@pytest.mark.parametrize("causal,mask,tq,tk", [(False, None, 37, 37), (True, None, 70, 70), (False, "padding", 33, 48),
                                               (False, "causal+padding", 40, 40), (False, "bool", 33, 130),
                                               (True, "float", 65, 65), (True, "padding", 20, 45),
                                               (True, None, 45, 20), (False, None, 1, 5)])
def test_tiles_equal_the_float64_twin_and_the_streaming_kernel(cut, causal, mask, tq, tk):
    scale = 0.4
    q, k, v, bias, tangents = make(torch.float64, Tq=tq, Tk=tk, mask=mask)
    plan = CUTS[cut] or tiles.plan(2, 4, tq, tk, 8, 2**30)
    want = r_ops(q, k, v, bias, tangents, causal, scale, *by_twin(causal, scale))
    for a, b in zip(r_ops(q, k, v, bias, tangents, causal, scale, *by_tiles(plan, causal, scale)), want):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    # float32: against the kernel and against the float64 twin
    q32, k32, v32 = (t.float() for t in (q, k, v))
    bias32 = bias.float() if bias is not None else None
    t32 = [t.float() for t in tangents]
    got = r_ops(q32, k32, v32, bias32, t32, causal, scale, *by_tiles(plan, causal, scale))
    kernel = r_ops(q32, k32, v32, bias32, t32, causal, scale, *by_kernel(causal, scale))
    for a, b, c in zip(got, kernel, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
        torch.testing.assert_close(a, c.float(), **TOL[torch.float32])


def test_fully_masked_rows_and_key_blocks_give_zeros():
    """A row whose every key is masked: R{O} = 0; keys no query sees (padding) get R{dK} = R{dV} = 0."""
    q, k, v, bias, tangents = make(torch.float64, Tq=12, Tk=12, mask="padding")
    bias = bias.clone()
    bias[0, :, 3, :] = float("-inf")
    cut = tiles.Plan(heads=4, block=4)
    o, lse = ops.attention_forward(q, k, v, bias, False, 0.5)
    ro, rho = tiles.rforward(q, k, v, bias, o, lse, *tangents, False, 0.5, cut)
    assert torch.isfinite(ro).all() and (ro[:, 0, :, 3] == 0).all() and (rho[:, 0, :, 3] == 0).all()
    rdq, rdk, rdv = tiles.rbackward(q, k, v, bias, o, lse, torch.randn_like(o), *tangents, ro, rho, None, False, 0.5, cut)
    assert (rdk[:, -1, :, 8:] == 0).all() and (rdv[:, -1, :, 8:] == 0).all()
    assert (rdq[:, 0, :, 3] == 0).all()


def test_plan_fits_the_cache_and_the_budget():
    # GPT-2's shapes: every head and query in tiles of TILE_BYTES or less
    cut = tiles.plan(4, 4, 256, 256, 4, 2**31)
    assert cut is not None
    assert tiles.TILE_SLOTS * cut.heads * cut.block * 256 * 4 <= tiles.TILE_BYTES
    # a long sequence: one head, a block of queries against all keys, many tiles
    cut = tiles.plan(1, 2, 8192, 8192, 4, 2**31)
    assert cut.heads == 1 and cut.block < 8192
    # a whole batch of heads fits: groups of whole batches
    cut = tiles.plan(8, 2, 16, 16, 4, 2**31)
    assert cut.heads % 2 == 0 and cut.heads > 2
    # the budget is below one head's smallest tile (MIN_BLOCK queries × all keys): streaming
    smallest = tiles.TILE_SLOTS * tiles.MIN_BLOCK * 4096 * 4
    assert tiles.plan(1, 2, 4096, 4096, 4, smallest - 1) is None
    assert tiles.plan(1, 2, 4096, 4096, 4, smallest) is not None
    assert tiles.plan(1, 2, 64, 64, 4, None) is None


def _peak_allocation_bytes(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_working_set_is_the_stated_formula():
    """Beyond its outputs and tangent-sized temporaries, the BLAS R-backward holds at most TILE_SLOTS tiles."""
    K, B, H, T, D = 2, 1, 2, 256, 16
    q, k, v, bias, tangents = make(torch.float32, B=B, H=H, Tq=T, Tk=T, D=D, Dv=D, K=K)
    o, lse = ops.attention_forward(q, k, v, None, False, 0.25)
    g = torch.randn_like(o)
    cut = tiles.Plan(heads=1, block=32)
    ro, rho = tiles.rforward(q, k, v, None, o, lse, *tangents, False, 0.25, cut)
    peak = _peak_allocation_bytes(lambda: tiles.rbackward(q, k, v, None, o, lse, g, *tangents, ro, rho, None, False,
                                                          0.25, cut))
    tangent = K * B * H * T * D * 4
    tile = cut.heads * cut.block * T * 4
    assert peak <= 4 * tangent + 2 * B * H * T * D * 4 + tiles.TILE_SLOTS * tile + 64 * 1024
    assert peak < K * B * H * T * T * 4  # far below one (K, B, H, T, T) matrix


def test_wrappers_take_tiles_within_the_budget_and_the_kernel_beyond(monkeypatch):
    q, k, v, bias, tangents = make(torch.float32, Tq=64, Tk=64, mask="padding")
    o, lse = ops.attention_forward(q, k, v, bias, False, 0.3)
    calls = []
    real = tiles.rforward
    monkeypatch.setattr(tiles, "rforward", lambda *a: calls.append("tiles") or real(*a))
    by_blas = ops.attention_rforward(q, k, v, bias, o, lse, *tangents, False, 0.3, memory_budget=2**30)
    assert calls == ["tiles"]
    streamed = ops.attention_rforward(q, k, v, bias, o, lse, *tangents, False, 0.3, memory_budget=1024)
    default = ops.attention_rforward(q, k, v, bias, o, lse, *tangents, False, 0.3)
    assert calls == ["tiles"]  # over the budget, and without one: the kernel
    for a, b, c in zip(by_blas, streamed, default):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
        assert torch.equal(b, c)
