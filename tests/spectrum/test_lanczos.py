"""hessgap.spectrum.eigenvalues against numpy.linalg.eigh and scipy's eigsh on matrices with a known spectrum."""

import json
import math

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

from hessgap.errors import HessgapError, NonFiniteError
from hessgap.spectrum import MatrixOperator, eigenvalues


def matrix_with_spectrum(spectrum, seed=0, dtype=torch.float64):
    """Q·diag(spectrum)·Qᵀ with a random orthogonal Q: a symmetric matrix whose eigenvalues are known."""
    generator = torch.Generator().manual_seed(seed)
    spectrum = torch.as_tensor(spectrum, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(len(spectrum), len(spectrum), generator=generator, dtype=torch.float64))
    A = (Q * spectrum) @ Q.T
    return ((A + A.T) / 2).to(dtype)


def expected(spectrum, k, which):
    values = np.sort(np.asarray(spectrum, dtype=np.float64))
    if which == "LA":
        return values[::-1][:k]
    if which == "SA":
        return values[:k]
    return values[np.argsort(-np.abs(values), kind="stable")][:k]


# Clustered outliers, a large negative eigenvalue and a bulk: the shape of a network's Hessian.
HESSIAN_LIKE = np.concatenate([[40.0, 25.0, 24.0, 23.5, 10.0, -30.0, -8.0], np.linspace(-1.0, 1.5, 113)])


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("k,block_size", [(1, 1), (3, 1), (6, 3), (4, 4)])
def test_matches_eigh_on_a_known_spectrum(which, k, block_size):
    A = matrix_with_spectrum(HESSIAN_LIKE, seed=k)
    result = eigenvalues(A, k=k, which=which, tol=1e-8, block_size=block_size)
    reference = expected(np.linalg.eigvalsh(A.numpy()), k, which)
    assert result.converged
    np.testing.assert_allclose(result.eigenvalues, reference, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(reference, expected(HESSIAN_LIKE, k, which), rtol=1e-10)


def test_eigenvectors_residuals_and_orthonormality():
    A = matrix_with_spectrum(HESSIAN_LIKE, seed=3)
    result = eigenvalues(A, k=5, which="LA", tol=1e-6, criterion="residual", block_size=2)
    X = result.eigenvectors.to(torch.float64)
    values = torch.tensor(result.eigenvalues, dtype=torch.float64)
    residuals = (X @ A - values[:, None] * X).norm(dim=1)
    np.testing.assert_allclose(result.residuals, residuals.numpy(), rtol=1e-6, atol=1e-12)
    assert (residuals <= 1e-6 * values.abs() + 1e-12).all()
    torch.testing.assert_close(X @ X.T, torch.eye(5, dtype=torch.float64), atol=1e-9, rtol=0)
    # Each eigenvector is the true one up to sign (distinct eigenvalues 40, 25, 24, 23.5, 10).
    w, U = np.linalg.eigh(A.numpy())
    true_vectors = U[:, np.argsort(-w)[:5]].T
    overlaps = np.abs(np.sum(true_vectors * X.numpy(), axis=1))
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-9)


def test_eigenvalue_criterion_bounds_the_error():
    """The default criterion stops earlier than the residual one but keeps |λ − θ| within tol·|λ|."""
    A = matrix_with_spectrum(HESSIAN_LIKE, seed=5)
    reference = expected(HESSIAN_LIKE, 3, "LA")
    by_value = eigenvalues(A, k=3, tol=1e-4)
    by_residual = eigenvalues(A, k=3, tol=1e-4, criterion="residual")
    assert by_value.converged and by_residual.converged
    assert by_value.hvps <= by_residual.hvps
    errors = np.abs(np.array(by_value.eigenvalues) - reference)
    assert (errors <= 1e-4 * np.abs(reference)).all()
    assert (errors <= np.array(by_value.error_estimates) + 1e-12).all()
    assert (np.array(by_residual.residuals) <= 1e-4 * np.abs(reference)).all()


def test_matches_scipy_eigsh():
    A = matrix_with_spectrum(HESSIAN_LIKE, seed=7)
    operator = MatrixOperator(A)
    for which in ("LA", "SA", "LM"):
        ours = eigenvalues(operator, k=4, which=which, tol=1e-9, block_size=2)
        theirs = scipy.sparse.linalg.eigsh(operator.as_linear_operator(), k=4, which=which, return_eigenvectors=False, tol=1e-12)
        np.testing.assert_allclose(np.sort(ours.eigenvalues), np.sort(theirs), rtol=1e-8)


def test_the_smallest_basis_matches_scipy_eigsh():
    """k = 1 on a basis of 3 vectors (and their 3 products): what fits a 0.5B-parameter model in 24 GB
    (benchmarks/llm_scale.py); restarted every step, it still reaches eigsh's λmax, with more products."""
    A = matrix_with_spectrum(HESSIAN_LIKE, seed=7)
    operator = MatrixOperator(A)
    small = eigenvalues(operator, k=1, tol=1e-9, max_basis=3, max_iter=2000, criterion="residual")
    theirs = scipy.sparse.linalg.eigsh(operator.as_linear_operator(), k=1, which="LA", return_eigenvectors=False,
                                       tol=1e-12)
    assert small.converged and small.max_basis == 3 and small.restarts > 0
    np.testing.assert_allclose(small.eigenvalues, theirs, rtol=1e-8)
    assert small.residuals[0] <= 1e-8 * abs(theirs[0])


def test_block_finds_a_repeated_eigenvalue():
    """A single start vector sees a repeated eigenvalue once; a block of two sees both copies."""
    spectrum = np.concatenate([[9.0, 9.0, 7.0, 5.0], np.linspace(-1, 1, 60)])
    A = matrix_with_spectrum(spectrum, seed=11)
    result = eigenvalues(A, k=3, block_size=2, tol=1e-10, criterion="residual")
    np.testing.assert_allclose(result.eigenvalues, [9.0, 9.0, 7.0], rtol=1e-9)
    X = result.eigenvectors.to(torch.float64)
    torch.testing.assert_close(X @ X.T, torch.eye(3, dtype=torch.float64), atol=1e-8, rtol=0)


def test_restarts_keep_the_answer_and_the_hvp_count_is_exact():
    A = matrix_with_spectrum(HESSIAN_LIKE, seed=2)
    result = eigenvalues(A, k=6, which="SA", block_size=2, max_basis=16, tol=1e-8, max_iter=1000)
    assert result.restarts > 0 and result.converged
    np.testing.assert_allclose(result.eigenvalues, expected(HESSIAN_LIKE, 6, "SA"), rtol=1e-7, atol=1e-9)
    operator = MatrixOperator(A)
    counted = eigenvalues(operator, k=2, block_size=3, tol=1e-6)
    assert counted.hvps == operator.hvps == 3 * counted.iterations


def test_whole_space_is_exact_for_tiny_matrices():
    A = matrix_with_spectrum([3.0, -2.0, 1.0, 0.5, 0.0], seed=1)
    result = eigenvalues(A, k=5, which="LA", block_size=2, tol=1e-12)
    assert result.converged
    np.testing.assert_allclose(result.eigenvalues, [3.0, 1.0, 0.5, 0.0, -2.0], atol=1e-12)
    assert max(result.residuals) < 1e-12
    assert result.hvps <= 6


def test_invariant_start_and_zero_matrix():
    identity = eigenvalues(torch.eye(30, dtype=torch.float64), k=2, tol=1e-10)
    np.testing.assert_allclose(identity.eigenvalues, [1.0, 1.0], rtol=1e-12)
    assert identity.converged
    zero = eigenvalues(torch.zeros(30, 30, dtype=torch.float64), k=1)
    assert zero.eigenvalues == [0.0] and zero.converged


def test_float32_operator_and_seed_reproducibility():
    A = matrix_with_spectrum(HESSIAN_LIKE, seed=4, dtype=torch.float32)
    first = eigenvalues(A, k=2, tol=1e-4, seed=3)
    again = eigenvalues(A, k=2, tol=1e-4, seed=3)
    assert first.dtype == "float32" and first.eigenvectors.dtype == torch.float32
    np.testing.assert_allclose(first.eigenvalues, [40.0, 25.0], rtol=1e-4)
    assert first.eigenvalues == again.eigenvalues
    assert torch.equal(first.eigenvectors, again.eigenvectors)


def test_not_converged_is_reported():
    A = matrix_with_spectrum(HESSIAN_LIKE, seed=6)
    with pytest.warns(RuntimeWarning, match="without reaching tol"):
        result = eigenvalues(A, k=4, which="SA", tol=1e-12, max_iter=3)
    assert not result.converged and result.iterations == 3


def test_result_serializes_without_eigenvectors(tmp_path):
    A = matrix_with_spectrum(HESSIAN_LIKE, seed=8)
    result = eigenvalues(A, k=2)
    payload = json.loads(result.to_json(str(tmp_path / "eig.json")))
    assert "eigenvectors" not in payload
    assert payload["eigenvalues"] == result.eigenvalues and payload["hvps"] == result.hvps
    assert payload["path"] == "matrix" and payload["n"] == A.shape[0]
    assert json.loads((tmp_path / "eig.json").read_text()) == payload
    result.save_eigenvectors(str(tmp_path / "vectors.pt"))
    assert torch.equal(torch.load(tmp_path / "vectors.pt", weights_only=True), result.eigenvectors)
    assert result.seconds > 0 and math.isfinite(result.seconds)


class NaNOperator:
    n, dtype, device = 10, torch.float64, torch.device("cpu")

    def matmat(self, V):
        return torch.full_like(V, math.nan)


class WrongShapeOperator(NaNOperator):
    def matmat(self, V):
        return V[:, :-1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "k must be a positive integer"),
        ({"k": 31}, "k = 31 eigenvalues asked for"),
        ({"k": 1.5}, "k must be a positive integer"),
        ({"which": "BE"}, "which must be one of"),
        ({"tol": 0.0}, "tol is a relative tolerance"),
        ({"tol": 2}, "tol is a relative tolerance"),
        ({"criterion": "angle"}, "criterion must be"),
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"max_iter": 0}, "max_iter must be a positive integer"),
        ({"k": 4, "block_size": 4, "max_basis": 10}, "max_basis = 10 is too small"),
        ({"seed": "one"}, "seed must be an int"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(HessgapError, match=message):
        eigenvalues(torch.eye(30, dtype=torch.float64), **kwargs)


def test_bad_operators():
    with pytest.raises(NonFiniteError, match="Hessian-vector product returned NaN"):
        eigenvalues(NaNOperator())
    with pytest.raises(HessgapError, match="same shape"):
        eigenvalues(WrongShapeOperator())
    with pytest.raises(HessgapError, match="without matmat"):
        eigenvalues(object())
    with pytest.raises(HessgapError, match="not symmetric"):
        eigenvalues(torch.triu(torch.ones(5, 5, dtype=torch.float64)))
    with pytest.raises(HessgapError, match="square"):
        eigenvalues(torch.ones(5, 4))
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        MatrixOperator(torch.full((3, 3), math.inf))
    with pytest.raises(HessgapError, match="only apply when a model is passed"):
        eigenvalues(torch.eye(3), [(torch.ones(1, 3), torch.zeros(1))])
    with pytest.raises(HessgapError, match="needs the data"):
        eigenvalues(torch.nn.Linear(3, 2))


def test_exported_from_hessgap():
    import hessgap
    import hessgap.spectrum as spectrum

    assert hessgap.eigenvalues is spectrum.eigenvalues
    assert hessgap.trace is spectrum.trace
    assert hessgap.density is spectrum.density


def test_a_start_near_the_top_eigenvector_converges_in_few_products():
    """A warm start (the previous measurement's eigenvector) reaches the cold run's eigenvalue with far fewer
    products; a start on the eigenvector itself needs one step."""
    A = matrix_with_spectrum(HESSIAN_LIKE, seed=9)
    w, U = np.linalg.eigh(A.numpy())
    top = torch.from_numpy(U[:, np.argmax(w)].copy())
    cold = eigenvalues(A, k=1, tol=1e-6)
    generator = torch.Generator().manual_seed(1)
    nearby = top + 0.01 * torch.randn(top.shape, generator=generator, dtype=torch.float64)
    warm = eigenvalues(A, k=1, tol=1e-6, start=nearby)
    exact = eigenvalues(A, k=1, tol=1e-6, start=top[None])
    for result in (cold, warm, exact):
        assert result.converged
        np.testing.assert_allclose(result.eigenvalues, [40.0], rtol=1e-6)
    assert exact.hvps == 1
    assert warm.hvps < cold.hvps


def test_start_fills_the_first_block_and_a_zero_row_becomes_random():
    A = matrix_with_spectrum(HESSIAN_LIKE, seed=10)
    w, U = np.linalg.eigh(A.numpy())
    order = np.argsort(-w)
    start = torch.from_numpy(U[:, order[:2]].T.copy())
    result = eigenvalues(A, k=3, block_size=3, tol=1e-8, start=start)
    np.testing.assert_allclose(result.eigenvalues, expected(HESSIAN_LIKE, 3, "LA"), rtol=1e-7)
    zero = eigenvalues(A, k=1, tol=1e-8, start=torch.zeros(A.shape[0], dtype=torch.float32))
    np.testing.assert_allclose(zero.eigenvalues, [40.0], rtol=1e-7)


@pytest.mark.parametrize(
    "start, message",
    [
        (torch.ones(29, dtype=torch.float64), r"start has shape \(29,\)"),
        (torch.ones(2, 30, dtype=torch.float64), r"1 <= r <= block_size = 1"),
        (torch.ones(30, dtype=torch.long), "floating-point tensor"),
        ([1.0] * 30, "floating-point tensor"),
        (torch.full((30,), math.nan, dtype=torch.float64), "NaN or inf"),
    ],
)
def test_bad_start(start, message):
    with pytest.raises(HessgapError, match=message):
        eigenvalues(torch.eye(30, dtype=torch.float64), start=start)


def test_a_start_on_a_lower_eigenvector_needs_min_iter_to_find_the_top():
    """Started exactly on the eigenvector of 25, the run accepts 25 at once; taking min_iter steps lets the
    basis grow past that invariant direction and find 40."""
    A = matrix_with_spectrum(HESSIAN_LIKE, seed=12)
    w, U = np.linalg.eigh(A.numpy())
    second = torch.from_numpy(U[:, np.argsort(-w)[1]].copy())
    fooled = eigenvalues(A, k=1, tol=1e-6, start=second)
    assert fooled.eigenvalues[0] == pytest.approx(25.0, rel=1e-9) and fooled.hvps == 1
    patient = eigenvalues(A, k=1, tol=1e-6, start=second, min_iter=12)
    assert patient.eigenvalues[0] == pytest.approx(40.0, rel=1e-6) and patient.iterations >= 12


def test_ritz_vectors_come_with_the_result_and_warm_start_the_next_call():
    A = matrix_with_spectrum(HESSIAN_LIKE, seed=13)
    w, U = np.linalg.eigh(A.numpy())
    top = U[:, np.argsort(-w)[:4]].T
    result = eigenvalues(A, k=1, tol=1e-10, ritz_vectors=4, max_iter=200, min_iter=60)
    assert result.ritz.shape == (4, A.shape[0])
    torch.testing.assert_close(result.ritz.norm(dim=1), torch.ones(4, dtype=torch.float64))
    overlaps = np.abs(np.sum(top * result.ritz.numpy(), axis=1))  # converged far enough: the top 4 eigenvectors
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-6)
    assert "ritz" not in result.to_dict() and eigenvalues(A, k=1).ritz is None
    combined = result.ritz[0] + 0.5 * result.ritz[1:].sum(0)
    warm = eigenvalues(A, k=1, tol=1e-6, start=combined, min_iter=5)
    assert warm.eigenvalues[0] == pytest.approx(40.0, rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [({"min_iter": 0}, "min_iter must be a positive integer"),
                                             ({"min_iter": 5, "max_iter": 4}, "min_iter = 5 exceeds max_iter = 4"),
                                             ({"ritz_vectors": -1}, "ritz_vectors must be an integer ≥ 0")])
def test_bad_min_iter_and_ritz_vectors(kwargs, message):
    with pytest.raises(HessgapError, match=message):
        eigenvalues(torch.eye(30, dtype=torch.float64), **kwargs)
