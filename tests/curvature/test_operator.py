"""The operators of hessgap.curvature.operator: HessianOperator against an explicit Hessian, MatrixOperator,
CheckedOperator and resolve_operator."""

import numpy as np
import pytest
import torch
from torch import nn

from hessgap import _extension
from hessgap.curvature.operator import CheckedOperator, HessianOperator, MatrixOperator, resolve_operator
from hessgap.errors import HessgapError

from oracles import assert_unchanged, explicit_hessian, randomize_batchnorm, snapshot


def _setup():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.GELU(), nn.Linear(5, 3)).double()
    model[1].running_var.uniform_(0.5, 2.0)
    loader = [(torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))) for _ in range(3)]
    return model, loader


@pytest.mark.parametrize("path", ["auto", "generic"])
def test_operator_interface(path):
    model, loader = _setup()
    hess = explicit_hessian(model, loader, nn.CrossEntropyLoss())
    snap = snapshot(model)
    op = HessianOperator(model, loader, path=path, cache_batches=True)
    assert op.n == hess.shape[0] == 4 * 5 + 5 + 5 + 5 + 5 * 3 + 3
    assert op.dtype == torch.float64 and op.device == torch.device("cpu") and op.shape == (op.n, op.n)
    assert op.path == ("fused" if path == "auto" and _extension.available() else "generic")
    V = torch.randn(4, op.n, dtype=torch.float64)
    HV = op.matmat(V)
    assert HV.shape == (4, op.n) and op.hvps == 4
    torch.testing.assert_close(HV, V @ hess, rtol=1e-10, atol=1e-12)
    v = torch.randn(op.n, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), hess @ v, rtol=1e-10, atol=1e-12)
    assert op.hvps == 5
    torch.testing.assert_close(op.flat_parameters(), torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert_unchanged(model, snap)


def test_scipy_linear_operator():
    from scipy.sparse.linalg import eigsh

    model, loader = _setup()
    hess = explicit_hessian(model, loader, nn.CrossEntropyLoss()).numpy()
    op = HessianOperator(model, loader)
    lin = op.as_linear_operator()
    assert lin.shape == (op.n, op.n) and lin.dtype == np.float64
    x = np.random.default_rng(0).standard_normal(op.n)
    np.testing.assert_allclose(lin.matvec(x), hess @ x, rtol=1e-10, atol=1e-12)
    X = np.random.default_rng(1).standard_normal((op.n, 3))
    np.testing.assert_allclose(lin.matmat(X), hess @ X, rtol=1e-10, atol=1e-12)
    top = eigsh(lin, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh(hess)[-2:], rtol=1e-8)


def test_float32_operator_with_float64_scipy_side():
    model, loader = _setup()
    hess = explicit_hessian(model, loader, nn.CrossEntropyLoss()).numpy()
    model32 = model.float()
    loader32 = [(x.float(), y) for x, y in loader]
    op = HessianOperator(model32, loader32)
    assert op.dtype == torch.float32
    x = np.random.default_rng(2).standard_normal(op.n)
    out = op.as_linear_operator().matvec(x)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, hess @ x, rtol=1e-4, atol=1e-5 * np.abs(hess @ x).max())


def test_operator_bad_input():
    model, loader = _setup()
    op = HessianOperator(model, loader)
    with pytest.raises(HessgapError, match="one vector of shape"):
        op.matvec(torch.randn(2, op.n, dtype=torch.float64))
    with pytest.raises(HessgapError, match="columns"):
        op.matmat(torch.randn(2, op.n + 1, dtype=torch.float64))
    with pytest.raises(HessgapError, match="yielded no batches"):
        HessianOperator(model, []).matvec(torch.zeros(op.n, dtype=torch.float64))
    with pytest.raises(HessgapError, match="path must be one of"):
        HessianOperator(model, loader, path="blas")


def test_kept_primal_passes_follow_changes_to_the_model():
    # with cached batches the operator keeps each batch's primal pass between calls; it must not go stale
    model, loader = _setup()
    op = HessianOperator(model, loader, cache_batches=True)
    V = torch.randn(3, op.n, dtype=torch.float64)
    first = op.matmat(V)
    torch.testing.assert_close(op.matmat(V), first, rtol=0, atol=0)
    with torch.no_grad():  # an optimizer-style in-place step and a BatchNorm statistic update
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model[1].running_mean.add_(0.3)
    hess = explicit_hessian(model, loader, nn.CrossEntropyLoss())
    torch.testing.assert_close(op.matmat(V), V @ hess, rtol=1e-10, atol=1e-12)
    model.load_state_dict({k: v.clone() + 0.05 for k, v in model.state_dict().items() if v.is_floating_point()},
                          strict=False)
    hess = explicit_hessian(model, loader, nn.CrossEntropyLoss())
    torch.testing.assert_close(op.matmat(V), V @ hess, rtol=1e-10, atol=1e-12)


class Residual(nn.Module):
    """Not a layer stack: the graph engine captures it (its parameters and buffers are inputs of the graph)."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.norm(self.a(x))) + x)


def _replace(model, edit):
    first = model.a if isinstance(model, Residual) else model[0]
    norm = model.norm if isinstance(model, Residual) else model[1]
    if edit == "load_state_dict(assign=True)":
        state = {k: v + 0.3 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=True)
    elif edit == "attribute":
        first.weight = nn.Parameter(torch.randn_like(first.weight))
    elif edit == "module":
        replacement = nn.Linear(4, first.out_features).double()
        if isinstance(model, Residual):
            model.a = replacement
        else:
            model[0] = replacement
    elif edit == "buffers":
        norm.running_mean = torch.randn_like(norm.running_mean)
        norm.running_var = torch.rand_like(norm.running_var) + 0.5
    else:  # the same Parameter object on new storage
        first.weight.data = torch.randn_like(first.weight)


@pytest.mark.parametrize("edit", ["load_state_dict(assign=True)", "attribute", "module", "buffers", ".data"])
@pytest.mark.parametrize("kind", ["layer stack", "graph", "generic"])
def test_replaced_parameters_are_followed(kind, edit):
    """Was: the old Hessian (fused and graph engines) or zero (generic path) after the model's Parameter
    objects were replaced; the graph engine's after its buffers were."""
    model, loader = _setup()
    if kind == "graph":
        torch.manual_seed(6)
        model = randomize_batchnorm(Residual().double()).eval()
    op = HessianOperator(model, loader, path="generic" if kind == "generic" else "auto", cache_batches=True)
    assert op.path == ("generic" if kind == "generic" or not _extension.available() else "fused")
    V = torch.randn(3, op.n, dtype=torch.float64)
    op.matmat(V)  # builds the plan, captures the graph, keeps the primal passes
    _replace(model, edit)
    hess = explicit_hessian(model, loader, nn.CrossEntropyLoss())
    torch.testing.assert_close(op.matmat(V), V @ hess, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matmat(V), HessianOperator(model, loader, path=op.path).matmat(V), rtol=1e-12,
                               atol=1e-14)
    torch.testing.assert_close(op.flat_parameters(), torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


def test_replaced_parameters_keep_a_selection_and_must_keep_their_shapes():
    model, loader = _setup()
    op = HessianOperator(model, loader, params=[model[3].weight])  # a tensor: followed by its name
    V = torch.randn(2, op.n, dtype=torch.float64)
    model[3].weight = nn.Parameter(torch.randn_like(model[3].weight))
    hess = explicit_hessian(model, loader, nn.CrossEntropyLoss(), params=["3.weight"])
    torch.testing.assert_close(op.matmat(V), V @ hess, rtol=1e-10, atol=1e-12)
    model[3] = nn.Linear(5, 4).double()
    with pytest.raises(HessgapError, match=r"replaced by ones of another shape.*\(3\.weight\).*new HessianOperator"):
        op.matmat(V)
    model[3].weight = nn.Parameter(torch.randn(3, 5, dtype=torch.float64), requires_grad=False)
    with pytest.raises(HessgapError, match="replaced since this operator was built.*frozen"):
        op.matmat(V)


# ---- the other operators: MatrixOperator, CheckedOperator, resolve_operator ---------------------------


def test_matrix_operator_multiplies_and_counts():
    A = torch.randn(6, 6, dtype=torch.float64)
    A = (A + A.T) / 2
    op = MatrixOperator(A)
    V = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), V @ A)
    torch.testing.assert_close(op.matvec(V[0]), A @ V[0])
    assert op.hvps == 4 and op.n == 6 and op.path == "matrix"
    x = np.random.default_rng(3).standard_normal(6)
    np.testing.assert_allclose(op.as_linear_operator().matvec(x), A.numpy() @ x, rtol=1e-12)
    with pytest.raises(HessgapError, match="matmat expects a"):
        op.matmat(torch.randn(2, 5, dtype=torch.float64))


def test_resolve_operator_builds_takes_or_refuses():
    model, loader = _setup()
    built = resolve_operator(model, loader, caller="eigenvalues")
    assert isinstance(built, HessianOperator) and built.objective.batches_cached
    matrix = resolve_operator(torch.eye(3, dtype=torch.float64))
    assert isinstance(matrix, MatrixOperator) and matrix.n == 3
    assert resolve_operator(matrix) is matrix
    with pytest.raises(HessgapError, match=r"eigenvalues\(model, data, ...\) needs the data"):
        resolve_operator(model, caller="eigenvalues")
    with pytest.raises(HessgapError, match="only apply when a model is passed"):
        resolve_operator(matrix, loss_fn=nn.MSELoss())
    with pytest.raises(HessgapError, match="without matmat"):
        resolve_operator(object(), caller="trace")


def test_checked_operator_counts_and_checks():
    checked = CheckedOperator(MatrixOperator(torch.eye(4, dtype=torch.float64)))
    assert checked.path == "matrix" and checked.device == torch.device("cpu")
    V = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(checked.matmat(V), V)
    assert checked.hvps == 2

    class Broken:
        n, dtype, device = 4, torch.float64, "cpu"

        def matmat(self, V):
            return V[:, :3]

    with pytest.raises(HessgapError, match="same shape"):
        CheckedOperator(Broken()).matmat(V)


def test_row_dots_sum_over_column_chunks_in_float64(monkeypatch):
    """zᵀHz over chunks of columns (no whole float64 copies of a probe) equals the one-shot float64 sum."""
    from hessgap.curvature import operator as operator_module

    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 1000, generator=gen), torch.randn(3, 1000, generator=gen)
    checked = CheckedOperator(MatrixOperator(torch.eye(1000)))
    monkeypatch.setattr(operator_module, "DOT_CHUNK", 64)
    dots = checked.row_dots(A, B)
    assert dots.dtype == torch.float64
    torch.testing.assert_close(dots, (A.double() * B.double()).sum(dim=1), rtol=1e-13, atol=1e-12)
