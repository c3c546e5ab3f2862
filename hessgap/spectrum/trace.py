"""Hutchinson's estimate of the Hessian trace, with every Rademacher probe in one batched product.

tr(H) = E[zᵀHz] for z with independent ±1 entries. All probes go through ``matmat`` together (in
chunks that fit a memory budget), and the spread of the per-probe values zᵀHz gives a standard
error and a Student-t confidence interval.
"""

from __future__ import annotations

import math
import time

import torch

from .._checks import positive_int
from ..curvature.operator import CheckedOperator, resolve_operator
from ..curvature.probes import rademacher
from ..errors import HessgapError
from ..names import TRACE_METHODS
from ._results import TraceResult
from .hutchpp import MIN_RESIDUAL_PROBES, hutchpp_estimates

# Probes and their products held at once: default chunk size for trace().
_CHUNK_BYTES = 512 * 2**20


def trace(
    model,
    data=None,
    *,
    num_probes: int = 64,
    batch: int | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = False,
    method: str = "hutchinson",
    **operator_options,
) -> TraceResult:
    """Hutchinson estimate of tr(H) from ``num_probes`` Rademacher probes, run as one batch (or Hutch++).

    ``model`` is a model, or an operator / square symmetric tensor: a model comes with its ``data`` (and
    ``operator_options``, the keywords of :class:`~hessgap.curvature.operator.HessianOperator`: ``loss_fn``,
    ``compute_loss``, ``weight_fn``, ``max_batches``, ``params``, ``train_mode``, ``group``, ...); an
    operator is any object with ``n``, ``dtype``, ``device`` and ``matmat``. Half-precision models
    multiply in their dtype; the probes and sums are float32. ``batch`` is the number of probes per ``matmat`` call (default: all of
    them, or fewer so that probes plus products stay within 512 MiB). The result holds ``value`` (the
    mean of the per-probe zᵀHz), ``stderr``, and ``ci``, a two-sided Student-t interval at
    ``confidence``; its variance is 2·Σ_{i≠j} H_ij², so the estimate is exact for a diagonal H.

    ``method="hutch++"`` or ``"adaptive-hutch++"`` spend the same ``num_probes`` products on a sketch of the
    top of the spectrum, taken exactly, and Hutchinson probes deflated of it (:mod:`hessgap.spectrum.hutchpp`):
    far lower error when a few eigenvalues dominate. ``estimates`` then holds the deflated probes' estimates of
    the remainder, ``low_rank`` the sketch's exact part and ``sketch`` its size; ``stderr`` and ``ci`` have the
    same meaning (the spread of the remainder's probes). ``curvature=`` picks the matrix for a model (the
    Hessian, ``"ggn"``, ``"empirical-fisher"``, ``"true-fisher"``).
    """
    started = time.perf_counter()
    positive_int(num_probes, "num_probes", "the number of random probe vectors")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not (0 < confidence < 1):
        raise HessgapError(f"confidence must lie in (0, 1), e.g. 0.95, got {confidence!r}")
    if method not in TRACE_METHODS:
        raise HessgapError(f"method must be one of {', '.join(TRACE_METHODS)}, got {method!r}")
    if method != "hutchinson" and num_probes < 2 * MIN_RESIDUAL_PROBES:
        raise HessgapError(f"{method} needs num_probes >= {2 * MIN_RESIDUAL_PROBES} (a sketch and at least "
                           f"{MIN_RESIDUAL_PROBES} deflated probes), got {num_probes}")
    operator = CheckedOperator(resolve_operator(model, data, caller="trace", **operator_options))
    n, dtype, device = operator.n, operator.dtype, operator.device
    if batch is None:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        batch = max(1, min(num_probes, _CHUNK_BYTES // (2 * n * itemsize)))
    else:
        positive_int(batch, "batch", "probes per batched Hessian product")
    operator.ranks.agree("the arguments of hessgap.trace", (num_probes, batch, seed, method))
    generator = operator.generator(seed)
    low_rank, sketch = 0.0, 0
    if method != "hutchinson":
        operator.refuse_sharded(f"trace(method={method!r})")
        low_rank, estimates, sketch = hutchpp_estimates(operator, num_probes, generator,
                                                        adaptive=method == "adaptive-hutch++")
        return _result(estimates, low_rank, sketch, method, confidence, num_probes, operator, started)

    from tqdm.auto import tqdm

    estimates: list[float] = []
    with tqdm(total=num_probes, desc="trace", unit="probe", disable=not progress, leave=False) as bar:
        while len(estimates) < num_probes:
            rows = min(batch, num_probes - len(estimates))
            Z = rademacher(rows, n, dtype=dtype, device=device, generator=generator)
            HZ = operator.matmat(Z)
            # zᵀHz summed in float64 (the terms cancel heavily), over every rank's shard for a sharded model
            estimates.extend(float(v) for v in operator.row_dots(Z, HZ))
            bar.update(rows)

    return _result(estimates, low_rank, sketch, method, confidence, num_probes, operator, started)


def _result(estimates, low_rank, sketch, method, confidence, num_probes, operator, started) -> TraceResult:
    """low_rank + the mean of the probes' estimates, with the Student-t interval of that mean."""
    values = torch.tensor(estimates, dtype=torch.float64)
    value = low_rank + float(values.mean())
    stderr = ci = None
    if len(estimates) > 1:
        from scipy.stats import t as student_t

        stderr = float(values.std(unbiased=True)) / math.sqrt(len(estimates))
        half = float(student_t.ppf(0.5 + confidence / 2, df=len(estimates) - 1)) * stderr
        ci = (value - half, value + half)
    return TraceResult(
        method=method,
        low_rank=low_rank,
        sketch=sketch,
        value=value,
        stderr=stderr,
        ci=ci,
        confidence=float(confidence),
        num_probes=num_probes,
        estimates=estimates,
        hvps=operator.hvps,
        seconds=time.perf_counter() - started,
        **operator.describe(),
    )
