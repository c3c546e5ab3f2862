"""The compiled LayerNorm/RMSNorm R-op kernels against their plain-PyTorch twins, the twins against autograd
of F.layer_norm / F.rms_norm, opcheck and the argument checks."""

import pytest
import torch
import torch.nn.functional as F

from hessgap import _extension
from hessgap.ops import norm_rop as ops

pytestmark = pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def rows(x, center, eps=1e-5):
    if center:
        var, mean = torch.var_mean(x, -1, unbiased=False, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        return (x - mean) * rstd, rstd.squeeze(-1)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * rstd, rstd.squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("rows_,width,k", [(7, 16, 3), (33, 257, 1), (1, 3, 5)])
def test_kernels_match_twins(dtype, center, rows_, width, k):
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(rows_, width, dtype=torch.float64, generator=gen) + 1
    xhat, rstd = rows(x, center)
    rx, a, ra = (torch.randn(*s, dtype=torch.float64, generator=gen) for s in ((k, rows_, width), (rows_, width), (k, rows_, width)))
    want_rxhat, want_m1 = ops.norm_rforward_reference(xhat, rstd, rx, center)
    want = ops.norm_rbackward_reference(xhat, rstd, a, ra, want_rxhat, want_m1, center)
    cast = [t.to(dtype) for t in (xhat, rstd, rx, a, ra)]
    got_rxhat, got_m1 = ops.norm_rforward(cast[0], cast[1], cast[2], center)
    torch.testing.assert_close(got_rxhat, want_rxhat.to(dtype), **TOL[dtype])
    torch.testing.assert_close(got_m1, want_m1.to(dtype), **TOL[dtype])
    got = ops.norm_rbackward(cast[0], cast[1], cast[3], cast[4], want_rxhat.to(dtype), want_m1.to(dtype), center)
    torch.testing.assert_close(got, want.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("center", [True, False])
def test_twins_are_the_derivatives_of_the_normalization(center):
    """R{x̂} is autograd's jvp of x̂(x); R{g_x} the jvp of x ↦ ∂⟨a, x̂⟩/∂x along (R{x}, R{a})."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 12, dtype=torch.float64, generator=gen)
    rx, a, ra = (torch.randn(5, 12, dtype=torch.float64, generator=gen) for _ in range(3))

    def normalize(x):
        return F.layer_norm(x, (12,), eps=1e-5) if center else F.rms_norm(x, (12,), eps=1e-5)

    xhat, rstd = rows(x, center)
    _, tangent = torch.func.jvp(normalize, (x,), (rx,))
    rxhat, m1 = ops.norm_rforward_reference(xhat, rstd, rx.unsqueeze(0), center)
    torch.testing.assert_close(rxhat[0], tangent, rtol=1e-12, atol=1e-13)

    def grad(x, a):
        return torch.func.vjp(normalize, x)[1](a)[0]

    first, second = torch.func.jvp(grad, (x, a), (rx, ra))
    torch.testing.assert_close(ops.norm_backward(xhat, rstd, a, center), first, rtol=1e-12, atol=1e-13)
    got = ops.norm_rbackward_reference(xhat, rstd, a, ra.unsqueeze(0), rxhat, m1, center)
    torch.testing.assert_close(got[0], second, rtol=1e-11, atol=1e-12)


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    xhat, rstd = rows(torch.randn(4, 8, generator=gen), True)
    rx, ra = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 4, 8, generator=gen)
    a = torch.randn(4, 8, generator=gen)
    torch.library.opcheck(torch.ops.hessgap.norm_rforward.default, (xhat, rstd, rx, True))
    rxhat, m1 = ops.norm_rforward(xhat, rstd, rx, True)
    torch.library.opcheck(torch.ops.hessgap.norm_rbackward.default, (xhat, rstd, a, ra, rxhat, m1, False))


def test_bad_arguments_raise_clear_errors():
    xhat, rstd = rows(torch.randn(4, 8), True)
    with pytest.raises(RuntimeError, match=r"rx must be \(k, rows, D\)"):
        ops.norm_rforward(xhat, rstd, torch.randn(2, 4, 7), True)
    with pytest.raises(RuntimeError, match=r"rstd must be \(rows,\)"):
        ops.norm_rforward(xhat, rstd[:2], torch.randn(2, 4, 8), True)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.norm_rforward(xhat, rstd, torch.randn(2, 4, 8, dtype=torch.float64), True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("center", [True, False])
def test_cuda_kernels_match_twins(dtype, center):
    if not _extension.cuda_kernels_built():
        pytest.skip("hessgap._C was built without CUDA kernels")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(129, 768, dtype=torch.float64, generator=gen)
    xhat, rstd = rows(x, center)
    rx, ra = (torch.randn(4, 129, 768, dtype=torch.float64, generator=gen) for _ in range(2))
    a = torch.randn(129, 768, dtype=torch.float64, generator=gen)
    want_rxhat, want_m1 = ops.norm_rforward_reference(xhat, rstd, rx, center)
    want = ops.norm_rbackward_reference(xhat, rstd, a, ra, want_rxhat, want_m1, center)
    cuda = [t.to(dtype).cuda() for t in (xhat, rstd, rx, a, ra)]
    got_rxhat, got_m1 = ops.norm_rforward(cuda[0], cuda[1], cuda[2], center)
    torch.testing.assert_close(got_rxhat.cpu(), want_rxhat.to(dtype), **TOL[dtype])
    torch.testing.assert_close(got_m1.cpu(), want_m1.to(dtype), **TOL[dtype])
    got = ops.norm_rbackward(cuda[0], cuda[1], cuda[3], cuda[4], got_rxhat, got_m1, center)
    torch.testing.assert_close(got.cpu(), want.to(dtype), **TOL[dtype])
    torch.library.opcheck(torch.ops.hessgap.norm_rforward.default, (cuda[0], cuda[1], cuda[2], center))
