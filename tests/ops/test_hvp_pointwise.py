"""The compiled hvp_* kernels against their plain-PyTorch twins, opcheck, and their argument checks."""

import pytest
import torch

from hessgap import _extension
from hessgap.ops import hvp_pointwise as ops

pytestmark = pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def _exact(reference, *tensors, **kwargs):
    """The twin evaluated in float64 and cast back: float32 kernels are judged against exact values."""
    dtype = tensors[0].dtype
    args = [t.double() if isinstance(t, torch.Tensor) else t for t in tensors]
    return reference(*args, **kwargs).to(dtype)


def _noncontiguous(shape, dtype, gen):
    # transpose of a contiguous tensor: the kernels must read the logical layout, not the storage order
    full = torch.randn(*reversed(shape), dtype=dtype, generator=gen)
    return full.permute(*reversed(range(len(shape))))


def _inputs(batch_shape, k, dtype, contiguous=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = (lambda s: torch.randn(*s, dtype=dtype, generator=gen)) if contiguous else (
        lambda s: _noncontiguous(s, dtype, gen)
    )
    z = 2 * make(batch_shape)
    g = make(batch_shape)
    rz = make((k,) + tuple(batch_shape))
    rg = make((k,) + tuple(batch_shape))
    return z, g, rz, rg


@pytest.mark.parametrize("kind", ops.ACTIVATION_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,k,contiguous", [((3, 7), 5, True), ((2, 3, 5, 5), 3, False), ((1031,), 1, True)])
def test_activation_kernels_match_reference(kind, dtype, shape, k, contiguous):
    z, g, rz, rg = _inputs(shape, k, dtype, contiguous)
    if not contiguous:
        assert not rz.is_contiguous()
    out = ops.act_jvp(z, rz, kind, slope=0.2)
    torch.testing.assert_close(out, _exact(ops.act_jvp_reference, z, rz, kind, slope=0.2), **TOL[dtype])
    out = ops.act_rbackward(z, g, rz, rg, kind, slope=0.2)
    expected = _exact(ops.act_rbackward_reference, z, g, rz, rg, kind, slope=0.2)
    torch.testing.assert_close(out, expected, **TOL[dtype])


def test_second_order_term_is_used():
    # tanh has σ'' ≠ 0: dropping the g·rz term must change the result (guards the reference too)
    z, g, rz, rg = _inputs((4, 6), 2, torch.float64)
    full = ops.act_rbackward(z, g, rz, rg, "tanh")
    first_order_only = ops.act_jvp(z, rg, "tanh")
    assert (full - first_order_only).abs().max() > 1e-3


def test_relu_at_zero_follows_pytorch():
    z = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    t = torch.ones(1, 3, dtype=torch.float64)
    assert ops.act_jvp(z, t, "relu").tolist() == [[0.0, 0.0, 1.0]]
    assert ops.act_jvp(z, t, "leaky_relu", slope=0.1).tolist() == [[0.1, 0.1, 1.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,classes,k,contiguous", [(5, 3, 4, True), (17, 11, 1, False), (2, 1973, 3, True)])
def test_softmax_ce_rgrad_matches_reference(dtype, batch, classes, k, contiguous):
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(batch, classes, dtype=dtype, generator=gen), -1)
    rz = torch.randn(k, batch, classes, dtype=dtype, generator=gen)
    if not contiguous:
        rz = torch.randn(classes, batch, k, dtype=dtype, generator=gen).permute(2, 1, 0)
        p = torch.softmax(torch.randn(classes, batch, dtype=dtype, generator=gen), 0).t()
    out = ops.softmax_ce_rgrad(p, rz, 0.25)
    torch.testing.assert_close(out, _exact(ops.softmax_ce_rgrad_reference, p, rz, 0.25), **TOL[dtype])


def test_softmax_ce_rgrad_is_the_cross_entropy_hessian():
    # independent check: the Hessian of mean CE w.r.t. the logits, from autograd, applied to one direction
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    target = torch.tensor([0, 3, 1])
    hess = torch.autograd.functional.hessian(lambda z: torch.nn.functional.cross_entropy(z, target), logits)
    v = torch.randn(1, 3, 4, dtype=torch.float64, generator=gen)
    expected = (hess.reshape(12, 12) @ v.reshape(12)).reshape(1, 3, 4)
    out = ops.softmax_ce_rgrad(torch.softmax(logits, -1), v, 1 / 3)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)


def test_opcheck():
    z, g, rz, rg = _inputs((3, 5), 2, torch.float32)
    torch.library.opcheck(torch.ops.hessgap.hvp_act_jvp.default, (z, rz, "gelu", 0.01))
    torch.library.opcheck(torch.ops.hessgap.hvp_act_rbackward.default, (z, g, rz, rg, "tanh", 0.01))
    p = torch.softmax(z, -1)
    torch.library.opcheck(torch.ops.hessgap.hvp_softmax_ce_rgrad.default, (p, rz, 0.5))


def test_empty_directions():
    z, g, rz, rg = _inputs((3, 5), 0, torch.float64)
    assert ops.act_rbackward(z, g, rz, rg, "sigmoid").shape == (0, 3, 5)


def test_bad_arguments_raise_clear_errors():
    z, g, rz, rg = _inputs((3, 5), 2, torch.float32)
    with pytest.raises(RuntimeError, match=r"must be \(k, \*z.shape\)"):
        ops.act_jvp(z, rz[:, :2], "relu")
    with pytest.raises(RuntimeError, match="dtype"):
        ops.act_jvp(z, rz.double(), "relu")
    with pytest.raises(RuntimeError, match="only float32 and float64"):
        ops.act_jvp(z.int(), rz.int(), "relu")  # half precision runs in float32 (tests/ops/test_precision.py)
    with pytest.raises(RuntimeError, match="g has shape"):
        ops.act_rbackward(z, g[:2], rz, rg, "tanh")
    with pytest.raises(RuntimeError, match="same k directions"):
        ops.act_rbackward(z, g, rz, rg[:1], "tanh")
    with pytest.raises(RuntimeError, match="unknown activation kind"):
        torch.ops.hessgap.hvp_act_jvp(z, rz, "swish", 0.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        ops.act_jvp(z, rz, "swish")
    with pytest.raises(RuntimeError, match=r"\(batch, classes\)"):
        ops.softmax_ce_rgrad(z.reshape(-1), rz, 1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_kernels_match_cpu(dtype):
    if not _extension.cuda_kernels_built():
        pytest.skip("hessgap._C was built without CUDA kernels")
    z, g, rz, rg = _inputs((37, 129), 5, dtype)
    for kind in ops.ACTIVATION_KINDS:
        args = (z, g, rz, rg)
        cuda_args = [t.cuda() for t in args]
        torch.testing.assert_close(ops.act_jvp(cuda_args[0], cuda_args[2], kind).cpu(), ops.act_jvp(z, rz, kind), **TOL[dtype])
        torch.testing.assert_close(ops.act_rbackward(*cuda_args, kind).cpu(), ops.act_rbackward(*args, kind), **TOL[dtype])
    p = torch.softmax(z, -1)
    torch.testing.assert_close(ops.softmax_ce_rgrad(p.cuda(), rz.cuda(), 0.3).cpu(), ops.softmax_ce_rgrad(p, rz, 0.3),
                               **TOL[dtype])
    torch.library.opcheck(torch.ops.hessgap.hvp_act_rbackward.default, tuple(cuda_args) + ("gelu", 0.01))


@pytest.mark.parametrize("kind", ops.ACTIVATION_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vectorized_derivatives_match_autograd(kind, dtype):
    """σ' and σ'' by vectorized ops (the graph engine's activations) against double autograd in float64."""
    z = torch.cat([torch.linspace(-8, 8, 1001, dtype=dtype), torch.zeros(1, dtype=dtype)])  # PyTorch's σ'(0) too
    d1, d2 = ops.act_derivatives(z, kind, slope=0.2)
    r1, r2 = (t.to(dtype) for t in ops.activation_derivatives_reference(z.double(), kind, slope=0.2))
    assert d1.dtype == dtype
    torch.testing.assert_close(d1, r1, **TOL[dtype])
    if kind in ("relu", "leaky_relu"):
        assert d2 is None and (r2 == 0).all()
    else:
        torch.testing.assert_close(d2, r2, **TOL[dtype])
