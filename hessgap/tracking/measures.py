"""What a :class:`~hessgap.tracking.tracker.Tracker` record holds: one function per measure, in the order they run.

Each function takes the tracker and the record being filled (earlier measures' values are in it) and returns
``(value, details)``: the number that goes into the record under the measure's name, and what else is worth
keeping about it (products, passes, residuals), which goes into ``record["details"][name]``. The functions
warm-start from, and update, the tracker's ``warm`` state (the previous record's top Ritz vectors and critical
learning rates), which is what makes a record along a smooth run cheap.
"""

from __future__ import annotations

import torch

from ..sharp.metric import sharpness
from ..spectrum.lanczos import eigenvalues
from ..spectrum.trace import trace
from .critical import COLD_EXPAND, critical_sharpness
from .update import gd_stability_factor

#: The first growth factor of a warm-started critical line search: the previous ηc is usually within 25 %.
WARM_EXPAND = 1.25
#: The largest tolerance of a cold λmax record (the first, or every one without warm starts).
COLD_TOL = 1e-3
#: The previous record's Ritz vectors a λmax record starts from: the top one, and the next ones at half weight.
WARM_RITZ = 4
WARM_WEIGHTS = (1.0, 0.5, 0.5, 0.5)


def lambda_max(tracker, record: dict) -> tuple[float, dict]:
    """The top Hessian eigenvalue by Lanczos, started from the previous record's top Ritz vectors.

    Where the top eigenvalues cluster (at the edge of stability, in a transformer's spectrum) their
    eigenvectors turn between records: the old top one can be the new fourth. Started on it alone, Lanczos
    accepted that fourth eigenvalue at once (5.6 % low on an MLP at the edge of stability); started on the
    previous top four Ritz vectors together it still accepted the second one now and then (3.5 % low on a
    GPT-2 at the edge of stability), because the default criterion's Kato–Temple estimate trusts a gap to Ritz
    values that have not met the missing eigenvalue yet. So a warm record starts from the four Ritz vectors
    combined (the top one at full weight) and accepts a pair by its residual, a bound: the run goes on until
    the Ritz vector is an eigenvector to ``tol``, and by then the basis has grown to the top of the cluster
    (no miss in the measured runs, at about the products of a cold run at the edge of stability and fewer
    before it). A cold record (the first) uses the default criterion.
    """
    operator = tracker.operator()
    ritz = tracker.warm.get("ritz") if tracker.warm_start else None
    start = None
    if ritz is not None and ritz.dim() == 2 and ritz.shape[1] == operator.n:  # else: written for other parameters
        weights = torch.tensor(WARM_WEIGHTS[: ritz.shape[0]], dtype=ritz.dtype, device=ritz.device)
        start = (weights[:, None] * ritz).sum(0)
    warm = start is not None
    # a cold start accepts by the eigenvalue criterion, which at tol 1e-2 took a lower eigenvalue (8 % low) on
    # an MLP at the edge of stability: it gets at most 1e-3; the residual criterion is a bound at any tol
    tol = tracker.tol if warm else min(tracker.tol, COLD_TOL)
    result = eigenvalues(operator, k=1, tol=tol, seed=tracker.seed, start=start, ritz_vectors=WARM_RITZ,
                         criterion="residual" if warm else "eigenvalue", min_iter=len(WARM_WEIGHTS) + 1 if warm else 1)
    tracker.warm["ritz"] = result.ritz.detach().clone()
    record["hvps"] += result.hvps
    return result.eigenvalues[0], {"hvps": result.hvps, "warm": warm, "residual": result.residuals[0],
                                   "converged": result.converged, "path": result.path}


def hessian_trace(tracker, record: dict) -> tuple[float, dict]:
    """Hutchinson's trace with the same Rademacher probes at every record (common random numbers: the
    record-to-record change is not drowned in probe noise)."""
    result = trace(tracker.operator(), num_probes=tracker.trace_probes, seed=tracker.seed)
    record["hvps"] += result.hvps
    return result.value, {"hvps": result.hvps, "stderr": result.stderr}


def keskar_sharpness(tracker, record: dict) -> tuple[float, dict]:
    """Metric 2.1 (ε-sharpness in percent) over the tracker's data."""
    result = sharpness(tracker.model, tracker.batches, tracker.epsilon, solver=tracker.sharpness_solver,
                       seed=tracker.seed, **tracker.data_options())
    record.setdefault("loss", result.loss)
    return result.value, {"evaluations": result.evaluations, "max_loss": result.max_loss,
                          "best_solver": result.best_solver, "epsilon": result.epsilon}


def _critical(tracker, record: dict, relative: bool) -> tuple[float | None, dict]:
    key = "relative_critical_lr" if relative else "critical_lr"
    previous = tracker.warm.get(key) if tracker.warm_start else None
    result = critical_sharpness(
        tracker.model, tracker.batches, tracker.optimizer, line_data=tracker.line_batches if relative else None,
        initial=previous, expand=WARM_EXPAND if previous else COLD_EXPAND, tol=tracker.critical_tol,
        **tracker.data_options(),
    )
    if result.critical_lr is not None:
        tracker.warm[key] = result.critical_lr
    if not relative:
        record.setdefault("loss", result.loss)
    details = {"critical_lr": result.critical_lr, "step_fraction": result.step_fraction,
               "forward_passes": result.forward_passes, "gradients": result.gradients, "warm": previous is not None}
    if result.note:
        details["note"] = result.note
    return result.value, details


def critical(tracker, record: dict) -> tuple[float | None, dict]:
    """Critical sharpness λc = 2/ηc along the optimizer's next update (Kalra et al. 2026)."""
    return _critical(tracker, record, relative=False)


def relative_critical(tracker, record: dict) -> tuple[float | None, dict]:
    """λc^{1→2}: along the update for the tracker's data, the loss over ``line_data``."""
    return _critical(tracker, record, relative=True)


def eos_ratio(tracker, record: dict) -> tuple[float, dict]:
    """λmax·η over SGD's stability limit (2 for plain gradient descent): 1 is the edge of stability."""
    factor, lr = gd_stability_factor(tracker.optimizer), record["lr"]
    return record["lambda_max"] * lr / factor, {"limit": factor / lr if lr > 0 else None}


#: name -> its function, in the order a record runs them (eos_ratio reads lambda_max's value)
MEASURES = {
    "lambda_max": lambda_max,
    "trace": hessian_trace,
    "critical_sharpness": critical,
    "relative_critical_sharpness": relative_critical,
    "sharpness": keskar_sharpness,
    "eos_ratio": eos_ratio,
}
#: what each measure needs besides the model and the data
NEEDS_OPTIMIZER = ("critical_sharpness", "relative_critical_sharpness", "eos_ratio")
NEEDS_LINE_DATA = ("relative_critical_sharpness",)
