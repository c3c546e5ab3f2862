"""hessgap.hvp against explicit Hessians (torch.autograd.functional.hessian) on tiny models, both paths."""

import copy

import pytest
import torch
from torch import nn

from hessgap import _extension
from hessgap.curvature.hvp import hvp
from hessgap.errors import HessgapError, NonFiniteError

from oracles import assert_unchanged, explicit_hessian, randomize_batchnorm, snapshot

needs_extension = pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def mlp(dtype):
    return randomize_batchnorm(
        nn.Sequential(
            nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(),
            nn.Sequential(nn.Linear(6, 4), nn.GELU()),
            nn.Dropout(0.3), nn.Linear(4, 4), nn.Sigmoid(),
            nn.Linear(4, 4), nn.GELU(approximate="tanh"), nn.Linear(4, 3), nn.LeakyReLU(0.2), nn.Linear(3, 3),
        ).to(dtype)
    )


def convnet(dtype):
    return randomize_batchnorm(
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(3, stride=2),
            nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Tanh(), nn.AvgPool2d(2, stride=1),
            nn.Flatten(), nn.Linear(4, 3),
        ).to(dtype)
    )


def signal_convnet(dtype):
    # a 1-D signal viewed as a 1×1×L image, as hessgap's C-nets do on MNIST-1D
    return nn.Sequential(
        nn.Unflatten(1, (1, 1, 5)), nn.Conv2d(1, 3, (1, 3), padding=(0, 1)), nn.ReLU(),
        nn.MaxPool2d((1, 2)), nn.Flatten(), nn.Linear(6, 3),
    ).to(dtype)


def mlp_batches(dtype, classification=True):
    gen = torch.Generator().manual_seed(3)
    out = []
    for size in (7, 4):  # unequal batches: the weighting by batch size is part of the test
        x = torch.randn(size, 5, dtype=dtype, generator=gen)
        y = torch.randint(0, 3, (size,), generator=gen) if classification else torch.randn(size, 3, dtype=dtype, generator=gen)
        out.append((x, y))
    return out


def conv_batches(dtype, classification=False):
    gen = torch.Generator().manual_seed(4)
    out = []
    for size in (5, 3):
        x = torch.randn(size, 2, 9, 9, dtype=dtype, generator=gen)
        y = torch.randint(0, 3, (size,), generator=gen) if classification else torch.randn(size, 3, dtype=dtype, generator=gen)
        out.append((x, y))
    return out


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


CASES = [
    ("mlp-ce", mlp, mlp_batches, nn.CrossEntropyLoss(), True),
    ("mlp-mse", mlp, lambda dt: mlp_batches(dt, classification=False), nn.MSELoss(), False),
    ("conv-mse", convnet, conv_batches, nn.MSELoss(), False),
    ("conv-ce", convnet, lambda dt: conv_batches(dt, classification=True), nn.CrossEntropyLoss(), True),
    ("signal-conv-ce", signal_convnet, mlp_batches, nn.CrossEntropyLoss(), True),
]


_EXACT: dict[str, tuple] = {}


def exact_case(name, make_model, make_batches, loss_fn):
    """(float64 model, float64 batches, explicit Hessian), computed once per case: float32 results are
    judged against the float64 Hessian, which is also far faster to get than a float32 one for convs."""
    if name not in _EXACT:
        torch.manual_seed(1)
        model = make_model(torch.float64)
        batches = make_batches(torch.float64)
        _EXACT[name] = (model, batches, explicit_hessian(model, batches, loss_fn))
    return _EXACT[name]


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize("name,make_model,make_batches,loss_fn,_", CASES, ids=[c[0] for c in CASES])
def test_matches_explicit_hessian(name, make_model, make_batches, loss_fn, _, path, dtype):
    model64, batches64, hess = exact_case(name, make_model, make_batches, loss_fn)
    model = copy.deepcopy(model64).to(dtype)
    model.train()  # the Hessian must still be taken in eval mode, and the mode restored
    batches = [(x.to(dtype), y.to(dtype) if y.is_floating_point() else y) for x, y in batches64]
    vectors = torch.randn(3, hess.shape[0], dtype=torch.float64)
    snap = snapshot(model)
    result = hvp(model, batches, vectors.to(dtype), loss_fn=loss_fn, path=path, return_info=True)
    assert result.path == path and result.fallback_reason is None
    assert result.batches == 2 and result.samples == sum(x.shape[0] for x, _ in batches)
    assert result.value.dtype == dtype
    assert rel_err(result.value.double(), vectors @ hess) <= TOL[dtype]
    assert_unchanged(model, snap)


@needs_extension
def test_list_form_and_one_batch():
    model = mlp(torch.float64)
    batch = mlp_batches(torch.float64)[0]
    hess = explicit_hessian(model, [batch], nn.CrossEntropyLoss())
    vectors = torch.randn(2, hess.shape[0], dtype=torch.float64)
    parts = [piece.reshape((2,) + p.shape) for piece, p in zip(vectors.split([p.numel() for p in model.parameters()], 1), model.parameters())]
    out = hvp(model, batch, parts)
    assert isinstance(out, list) and [o.shape for o in out] == [p.shape for p in parts]
    flat = torch.cat([o.reshape(2, -1) for o in out], 1)
    assert rel_err(flat, vectors @ hess) <= 1e-10


@needs_extension
@pytest.mark.parametrize("path", ["fused", "generic"])
def test_chunking_gives_the_same_answer(path):
    model = convnet(torch.float64)
    batches = conv_batches(torch.float64)
    n = sum(p.numel() for p in model.parameters())
    vectors = torch.randn(5, n, dtype=torch.float64)
    whole = hvp(model, batches, vectors, loss_fn=nn.MSELoss(), path=path, return_info=True)
    chunked = hvp(model, batches, vectors, loss_fn=nn.MSELoss(), path=path, chunk_size=2, return_info=True)
    tiny_budget = hvp(model, batches, vectors, loss_fn=nn.MSELoss(), path=path, memory_budget=1, return_info=True)
    assert whole.chunk_size == 5 and chunked.chunk_size == 2 and tiny_budget.chunk_size == 1
    torch.testing.assert_close(chunked.value, whole.value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tiny_budget.value, whole.value, rtol=1e-12, atol=1e-12)


@needs_extension
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_frozen_parameters_are_left_out(arch):
    torch.manual_seed(2)
    if arch == "mlp":
        model, batches, loss_fn = mlp(torch.float64), mlp_batches(torch.float64), nn.CrossEntropyLoss()
        frozen = [model[0].weight, model[3][0].bias, model[1].weight]
    else:
        model, batches, loss_fn = convnet(torch.float64), conv_batches(torch.float64), nn.MSELoss()
        frozen = [model[0].weight, model[4].weight, model[1].bias]  # leaves bias-only directions in convs
    for p in frozen:
        p.requires_grad_(False)
    hess = explicit_hessian(model, batches, loss_fn)
    vectors = torch.randn(2, hess.shape[0], dtype=torch.float64)
    for path in ("fused", "generic"):
        assert rel_err(hvp(model, batches, vectors, loss_fn=loss_fn, path=path), vectors @ hess) <= 1e-10


@needs_extension
def test_ignore_index_targets():
    model = mlp(torch.float64)
    loss_fn = nn.CrossEntropyLoss(ignore_index=1)
    batches = mlp_batches(torch.float64)
    assert any((y == 1).any() for _, y in batches)
    hess = explicit_hessian(model, batches, loss_fn)
    vectors = torch.randn(2, hess.shape[0], dtype=torch.float64)
    result = hvp(model, batches, vectors, loss_fn=loss_fn, return_info=True)
    assert result.path == "fused"
    assert rel_err(result.value, vectors @ hess) <= 1e-10


@needs_extension
@pytest.mark.parametrize(
    "model,loss_fn,reason",
    [
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.ELU(), nn.Linear(4, 3)), nn.CrossEntropyLoss(), "ELU"),
        (lambda: nn.Sequential(nn.Linear(4, 3)), nn.L1Loss(), "L1Loss"),
    ],
)
def test_unsupported_falls_back_to_generic(model, loss_fn, reason):
    model = model().double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen) if not isinstance(loss_fn, nn.L1Loss) else torch.randn(6, 3, dtype=torch.float64)
    hess = explicit_hessian(model, [(x, y)], loss_fn)
    vectors = torch.randn(2, hess.shape[0], dtype=torch.float64)
    result = hvp(model, (x, y), vectors, loss_fn=loss_fn, return_info=True)
    assert result.path == "generic"
    assert reason in result.fallback_reason
    assert rel_err(result.value, vectors @ hess) <= 1e-10 or (vectors @ hess).norm() == 0
    with pytest.raises(HessgapError, match="fused HVP path cannot run"):
        hvp(model, (x, y), vectors, loss_fn=loss_fn, path="fused")


@needs_extension
def test_unsupported_targets_found_mid_pass_fall_back():
    # class-probability targets are valid for CrossEntropyLoss but not fused: detected at the first batch
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.softmax(torch.randn(5, 3, dtype=torch.float64), -1)
    hess = explicit_hessian(model, [(x, y)], nn.CrossEntropyLoss())
    vectors = torch.randn(2, hess.shape[0], dtype=torch.float64)
    result = hvp(model, (x, y), vectors, return_info=True)
    assert result.path == "generic" and "class indices" in result.fallback_reason
    assert rel_err(result.value, vectors @ hess) <= 1e-10


@needs_extension
def test_train_mode_hessian_runs_generic():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    n = sum(p.numel() for p in model.parameters())
    snap = snapshot(model)
    result = hvp(model, (x, y), torch.randn(2, n, dtype=torch.float64), train_mode=True, return_info=True)
    assert result.path == "generic" and "train mode" in result.fallback_reason
    assert_unchanged(model, snap)  # batch statistics must not leak into the running buffers
    eval_result = hvp(model, (x, y), torch.randn(2, n, dtype=torch.float64), return_info=True)
    assert eval_result.path == "fused"


def test_result_is_json_serializable():
    import json

    model = nn.Sequential(nn.Linear(3, 2)).double()
    result = hvp(model, (torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])),
                 torch.randn(1, 8, dtype=torch.float64), return_info=True)
    data = json.loads(result.to_json())
    assert data["k"] == 1 and data["path"] in ("fused", "generic") and data["samples"] == 4


# ---- bad input ------------------------------------------------------------------------------------------


def _small():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    batch = (torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))
    return model, batch


@pytest.mark.parametrize("path", ["auto", "generic"])
def test_bad_vectors(path):
    model, batch = _small()
    with pytest.raises(HessgapError, match="n = 8 trainable"):
        hvp(model, batch, torch.randn(2, 7, dtype=torch.float64), path=path)
    with pytest.raises(HessgapError, match=r"\(k, n\)"):
        hvp(model, batch, torch.randn(8, dtype=torch.float64), path=path)
    with pytest.raises(HessgapError, match="k = 0"):
        hvp(model, batch, torch.randn(0, 8, dtype=torch.float64), path=path)
    with pytest.raises(HessgapError, match="list of 1 tensors"):
        hvp(model, batch, [torch.randn(2, 2, 3, dtype=torch.float64)], path=path)
    with pytest.raises(HessgapError, match=r"expected \(k, \*\(2,\)\)"):
        hvp(model, batch, [torch.randn(2, 2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)], path=path)
    with pytest.raises(HessgapError, match="same leading dimension"):
        hvp(model, batch, [torch.randn(2, 2, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)], path=path)
    bad = torch.randn(2, 8, dtype=torch.float64)
    bad[1, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        hvp(model, batch, bad, path=path)
    with pytest.raises(HessgapError, match="is on meta but the model's parameters are on cpu"):
        hvp(model, batch, torch.randn(2, 8, device="meta"), path=path)
    with pytest.raises(HessgapError, match="floating point"):
        hvp(model, batch, torch.ones(2, 8, dtype=torch.int64), path=path)


@pytest.mark.parametrize("path", ["auto", "generic"])
def test_bad_data_and_loss(path):
    model, batch = _small()
    v = torch.randn(1, 8, dtype=torch.float64)
    with pytest.raises(HessgapError, match="yielded no batches"):
        hvp(model, [], v, path=path)
    with pytest.raises(HessgapError, match="not a scalar"):
        hvp(model, batch, v, loss_fn=nn.CrossEntropyLoss(reduction="none"), path=path)
    x, y = batch
    x = x.clone()
    x[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="loss of batch 0"):
        hvp(model, (x, y), v, path=path)
    with pytest.raises(HessgapError, match="path must be one of"):
        hvp(model, batch, v, path="fast")
    with pytest.raises(HessgapError, match="chunk_size"):
        hvp(model, batch, v, chunk_size=0)


@pytest.mark.cuda
@needs_extension
@pytest.mark.parametrize("name,make_model,make_batches,loss_fn,_", CASES, ids=[c[0] for c in CASES])
def test_cuda_matches_explicit_hessian(name, make_model, make_batches, loss_fn, _):
    if not _extension.cuda_kernels_built():
        pytest.skip("hessgap._C was built without CUDA kernels")
    model64, batches64, hess = exact_case(name, make_model, make_batches, loss_fn)
    model = copy.deepcopy(model64).cuda()
    batches = [(x.cuda(), y.cuda()) for x, y in batches64]
    vectors = torch.randn(3, hess.shape[0], dtype=torch.float64)
    for path in ("fused", "generic"):
        result = hvp(model, batches, vectors.cuda(), loss_fn=loss_fn, path=path, return_info=True)
        assert result.path == path
        assert rel_err(result.value.cpu(), vectors @ hess) <= 1e-10


def test_half_precision_model_sums_in_float32():
    model = nn.Sequential(nn.Linear(3, 2)).to(torch.bfloat16)
    batch = (torch.randn(4, 3, dtype=torch.bfloat16), torch.tensor([0, 1, 1, 0]))
    result = hvp(model, batch, torch.randn(1, 8, dtype=torch.bfloat16), return_info=True)
    # the products run in bfloat16 (on the graph engine when the extension is built: the layer-stack engine
    # takes float32/float64), their sum over the loader is float32 (and so is the result)
    assert result.path == ("fused" if _extension.available() else "generic") and result.value.dtype == torch.float32
    assert (result.dtype, result.accumulation_dtype) == ("bfloat16", "float32")


@needs_extension
@pytest.mark.parametrize("path", ["fused", "generic"])
def test_loss_by_product_and_max_batches(path):
    from hessgap.curvature.objective import LossOverData

    model64, batches, hess_all = exact_case(*CASES[0][:4])
    model = copy.deepcopy(model64)
    first_only = explicit_hessian(model, batches[:1], nn.CrossEntropyLoss())
    vectors = torch.randn(2, first_only.shape[0], dtype=torch.float64)
    result = hvp(model, batches, vectors, path=path, max_batches=1, return_info=True)
    assert result.batches == 1 and result.samples == batches[0][0].shape[0]
    assert rel_err(result.value, vectors @ first_only) <= 1e-10
    assert rel_err(vectors @ first_only, vectors @ hess_all) > 1e-3  # the two Hessians really differ
    full = hvp(model, batches, vectors, path=path, return_info=True)
    expected_loss = LossOverData(model.eval(), batches).value()
    assert full.loss == pytest.approx(expected_loss, rel=1e-12)


@needs_extension
def test_sequence_shaped_inputs():
    # Linear over the last dimension of (B, L, features) and BatchNorm1d over (B, C, L)
    torch.manual_seed(6)
    model = randomize_batchnorm(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.BatchNorm1d(3), nn.Linear(5, 2))).double()
    x, y = torch.randn(6, 3, 4, dtype=torch.float64), torch.randn(6, 3, 2, dtype=torch.float64)
    hess = explicit_hessian(model, [(x, y)], nn.MSELoss())
    vectors = torch.randn(2, hess.shape[0], dtype=torch.float64)
    result = hvp(model, (x, y), vectors, loss_fn=nn.MSELoss(), return_info=True)
    assert result.path == "fused"
    assert rel_err(result.value, vectors @ hess) <= 1e-10


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(chunk_size=1.5), "chunk_size must be a positive integer"),
        (dict(chunk_size=-2), "chunk_size must be a positive integer"),
        (dict(memory_budget=0), "memory_budget must be a positive number of bytes"),
        (dict(memory_budget=float("nan")), "memory_budget must be a positive number of bytes"),
        (dict(max_memory="lots"), 'max_memory must be a positive number of bytes or a size such as "8GB"'),
        (dict(max_memory="1GB", memory_budget=10**9), "not both"),
    ],
)
def test_bad_chunking_arguments(kwargs, match):
    model, batch = _small()
    with pytest.raises(HessgapError, match=match):
        hvp(model, batch, torch.randn(1, 8, dtype=torch.float64), **kwargs)


def test_max_memory_string_bounds_the_directions_per_chunk():
    model, batch = _small()
    vectors = torch.randn(6, 8, dtype=torch.float64)
    roomy = hvp(model, batch, vectors, max_memory="1GiB", return_info=True)
    tight = hvp(model, batch, vectors, max_memory="1", return_info=True)
    old_name = hvp(model, batch, vectors, memory_budget=1, return_info=True)
    assert roomy.chunk_size == 6 and tight.chunk_size == old_name.chunk_size == 1
    assert rel_err(tight.value, roomy.value) <= 1e-12
