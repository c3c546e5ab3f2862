"""The compiled kernels take float32 and float64: half-precision arguments run in float32 and come back in
their own dtype, row statistics (log-sum-exp, ρ, m1) in float32."""

import pytest
import torch

from hessgap import _extension
from hessgap.ops import attention_rop, hvp_pointwise, norm_rop

pytestmark = pytest.mark.skipif(not _extension.available(), reason="compiled extension not built")


def test_attention_runs_half_precision_in_float32_and_keeps_its_statistics_there():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=gen).to(torch.bfloat16) for _ in range(3))
    o, lse = attention_rop.attention_forward(q, k, v, None, True, 0.5)
    o32, lse32 = attention_rop.attention_forward(q.float(), k.float(), v.float(), None, True, 0.5)
    assert (o.dtype, lse.dtype) == (torch.bfloat16, torch.float32)
    assert torch.equal(o, o32.to(torch.bfloat16)) and torch.equal(lse, lse32)
    rq, rk, rv = (torch.randn(3, 1, 2, 5, 4, generator=gen).to(torch.bfloat16) for _ in range(3))
    ro, rho = attention_rop.attention_rforward(q, k, v, None, o, lse, rq, rk, rv, True, 0.5)
    assert (ro.dtype, rho.dtype) == (torch.bfloat16, torch.float32)


def test_norm_and_pointwise_kernels_take_half_precision():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=gen)
    rstd = torch.rsqrt(x.pow(2).mean(1) + 1e-6)
    xhat = (x * rstd.unsqueeze(1)).to(torch.float16)
    rx = torch.randn(2, 6, 8, generator=gen).to(torch.float16)
    rxhat, m1 = norm_rop.norm_rforward(xhat, rstd.to(torch.float16), rx, False)
    ref, ref_m1 = norm_rop.norm_rforward(xhat.float(), rstd.to(torch.float16).float(), rx.float(), False)
    assert (rxhat.dtype, m1.dtype) == (torch.float16, torch.float32)
    assert torch.equal(rxhat, ref.to(torch.float16)) and torch.equal(m1, ref_m1)
    z = torch.randn(6, 8, generator=gen).to(torch.bfloat16)
    t = torch.randn(2, 6, 8, generator=gen).to(torch.bfloat16)
    out = hvp_pointwise.act_jvp(z, t, "gelu")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, hvp_pointwise.act_jvp_reference(z.float(), t.float(), "gelu").to(torch.bfloat16))
