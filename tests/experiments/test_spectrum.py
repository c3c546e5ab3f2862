"""Experiment 8 in the tiny full run: the top eigenvalues against scipy's ARPACK on plain double-backward
Hessian-vector products, and the sharpness shared with experiment 2."""

import pytest
import torch
import torch.nn.functional as F

from hessgap.train.data import load_dataset

from tiny_runs import load_trained

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_top_eigenvalues(model, data, k: int = 2) -> list[float]:
    """Top-k eigenvalues of the training-loss Hessian (eval mode, whole training set, float64) by scipy's
    ARPACK on plain double-backward Hessian-vector products: independent of hessgap's HVP engine."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    model = model.double().eval()
    params = list(model.parameters())
    x, y = data.train.tensors
    loss = F.cross_entropy(model(x.double()), y)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])

    def matvec(v):
        hv = torch.autograd.grad(grad @ torch.as_tensor(v, dtype=torch.float64).reshape(-1), params, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).numpy()

    n = grad.numel()
    values = eigsh(LinearOperator((n, n), matvec=matvec, dtype="float64"), k=k, which="LA", tol=1e-10,
                   return_eigenvectors=False)
    return sorted(values.tolist(), reverse=True)


def test_spectrum_matches_a_reference_eigensolver(full_run):
    path, settings, outcome = full_run
    spectrum = outcome["spectrum"]
    data = load_dataset("digits")
    for regime in ("sb", "lb"):
        entry = spectrum["models"][regime]
        reference = _reference_top_eigenvalues(load_trained(path, entry["model"]).model, data)
        assert entry["eigenvalues"] == pytest.approx(reference, rel=1e-3)
        assert entry["trace"] is not None and entry["trace_ci"] is not None
        same = next(r for r in outcome["sharpness"]["rows"]
                    if r["model"] == entry["model"] and r["space"] == "full" and r["epsilon"] == 1e-3)
        assert entry["sharpness"] == same["value"]  # one measurement per network, shared by the experiments
