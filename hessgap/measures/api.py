"""``hessgap.measures(model, data, names=None)``: many sharpness, flatness and norm measures of one minimum in
one call, each with its settings and timing, and whether it is *checked* invariant to the rescalings of the
weights that leave the network's function unchanged.

The invariance check builds two rescaled copies of the model (:mod:`hessgap.measures.rescale`: ReLU and
BatchNorm symmetries, the outputs verified unchanged on the data): one with the factors (α, β), one with
their inverses (1/α, 1/β), which moves every layer the other way. Each copy is measured with the same
settings and seeds (the same random draws), and a measure is called invariant when neither value moved by
more than ``invariance_rtol`` of its size (a ratio of two non-invariant quantities can move little under one
rescaling and much under the other). The model itself is never modified.

On several ranks (a default process group), each rank passes its shard of the data and every measure is
taken over all of it: the ranks first agree on the model and every argument (a rank with a wrong or different
argument makes every rank raise the same error before any work), then each sum over the data runs across
the ranks, and every rank returns the same result as one process on all the data.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from torch import nn

from .. import _checks
from .._results import JsonResult
from ..curvature.objective import LossOverData
from ..distributed import Ranks
from ..errors import HessgapError
from ..names import CURVATURES
from . import registry
from .context import Context, NotApplicable
from .rescale import BATCHNORM_FACTOR, RELU_FACTOR, NoSymmetry, check_factor, check_rtol, rescaled_copy

DEFAULT_RTOL = 0.05


@dataclass(repr=False)
class MeasuresResult(JsonResult):
    """The measures of one model, by name.

    ``values``: the number (None when the measure does not apply; ``not_applicable`` says why). ``stderr``:
    its standard error when it is a Monte Carlo or Hutchinson estimate. ``invariant``: the checked answer,
    True / False, or None when it could not be checked (``invariance[name]["reason"]``); ``invariance`` also
    holds the declared answer of the literature, the two rescaled copies' values and the larger relative
    change.
    ``settings``: every setting each measure ran with; ``seconds``: each one's time (the invariance check
    excluded; ``check_seconds`` holds it); ``details`` and ``notes``: what else each found.
    """

    values: dict[str, float | None]
    invariant: dict[str, bool | None]
    settings: dict[str, dict]
    seconds: dict[str, float]
    notes: dict[str, list[str]] = field(default_factory=dict)
    stderr: dict[str, float | None] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)
    invariance: dict[str, dict] = field(default_factory=dict)
    details: dict[str, dict] = field(default_factory=dict)
    check_seconds: dict[str, float] = field(default_factory=dict)
    rescaling: str = ""
    num_parameters: int = 0
    num_samples: int = 0
    seed: int = 0
    total_seconds: float = 0.0

    def rows(self) -> list[list]:
        """(name, value, stderr, invariant, declared, seconds) per measure, for tables."""
        out = []
        for name, value in self.values.items():
            out.append([name, value, self.stderr.get(name), self.invariant.get(name),
                        self.invariance.get(name, {}).get("declared"), self.seconds.get(name)])
        return out

    def __str__(self) -> str:
        lines = [f"{len(self.values)} measures over {self.num_samples} samples, n = {self.num_parameters}, "
                 f"{self.total_seconds:.1f} s"]
        for name, value, stderr, invariant, _, seconds in self.rows():
            if value is None:
                lines.append(f"  {name:24s} n/a: {self.not_applicable.get(name, '')}")
                continue
            err = f" ± {stderr:.2g}" if stderr is not None else ""
            inv = {True: "invariant", False: "not invariant", None: "invariance unchecked"}[invariant]
            lines.append(f"  {name:24s} {value:.6g}{err}  ({inv}, {seconds:.1f} s)")
        return "\n".join(lines)


def _read_batches(objective: LossOverData) -> tuple[list, int]:
    """The data's batches, moved to the model's device and kept, and the number of samples (of every rank)."""
    objective.cache_batches()
    batches = [batch.raw for batch in objective.batches()]
    return batches, objective.num_samples()


def _arguments(model, data, names, loss_fn, options, seed, max_batches, check_invariance, invariance_rtol,
               relu_factor, batchnorm_factor, progress) -> tuple[list, dict, LossOverData, tuple]:
    """The measures chosen, their settings and the objective over the data, each argument checked; and what
    the ranks must agree on."""
    chosen = registry.resolve(names)
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise HessgapError(f"options must map measure names to settings dicts, got {type(options).__name__}")
    for key, value in options.items():
        _checks.choice(key, registry.NAMES, "measure in options")
        if not isinstance(value, dict):
            raise HessgapError(f"options[{key!r}] must be a dict of settings, got {type(value).__name__}")
    settings = {m.name: m.settings(options.get(m.name)) for m in chosen}
    if not isinstance(model, nn.Module):
        raise HessgapError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise HessgapError("the model has no trainable parameters to measure")
    _checks.seed(seed)
    _checks.flag(check_invariance, "check_invariance")
    _checks.flag(progress, "progress")
    factors = (check_factor(relu_factor, "relu_factor"), check_factor(batchnorm_factor, "batchnorm_factor"))
    check_rtol(invariance_rtol, factors)
    objective = LossOverData(model, data, loss_fn=loss_fn, max_batches=max_batches, cache_batches=True)
    agreed = (objective.parameter_digest(), [m.name for m in chosen], sorted(settings.items()), seed, max_batches,
              check_invariance, invariance_rtol, relu_factor, batchnorm_factor)
    return chosen, settings, objective, agreed


def _changed(a: float, b: float) -> float:
    """|a − b| relative to the larger of the two (0 when both vanish)."""
    scale = max(abs(a), abs(b))
    return 0.0 if scale < 1e-12 else abs(a - b) / scale


def measures(model: nn.Module, data, names=None, *, loss_fn=None, options: dict | None = None, seed: int = 0,
             max_batches: int | None = None, check_invariance: bool = True, invariance_rtol: float = DEFAULT_RTOL,
             relu_factor: float = RELU_FACTOR, batchnorm_factor: float = BATCHNORM_FACTOR,
             progress: bool = False, curvature: str = "hessian") -> MeasuresResult:
    """Sharpness, flatness and norm measures of ``model`` at its current weights over ``data``.

    Args:
        model: any ``nn.Module``; left exactly as it was (weights, buffers, modes), also on error.
        data: a DataLoader, any iterable of batches, or one batch (as :func:`hessgap.sharpness`); read once
            and kept, so every measure sees the same batches. Use the training data: the measures describe
            the minimum the training loss found.
        names: measure names (a list, or one comma-separated string); None for all of
            :data:`hessgap.measures.NAMES`.
        loss_fn: ``loss_fn(outputs, targets)`` → the batch's mean loss (cross-entropy by default).
        options: per-measure settings, e.g. ``{"keskar": {"epsilon": 5e-4}, "gaussian": {"samples": 64}}``.
        seed: seeds every random draw (subspaces, Gaussian noise, probes, batch splits).
        max_batches: use only the first batches of ``data``.
        check_invariance: also measure two rescaled copies and report ``invariant``; about triples the time.
        invariance_rtol: the relative change below which a measure counts as invariant.
        relu_factor, batchnorm_factor: the scales α of the ReLU and β of the BatchNorm rescaling (the second
            copy uses 1/α and 1/β).
        progress: a tqdm bar over the measures.
        curvature: the matrix of the Hessian measures (hessian_lmax, hessian_trace, scaled_*): ``"hessian"``
            (default), ``"ggn"``, ``"empirical-fisher"`` or ``"true-fisher"`` (:data:`hessgap.names.CURVATURES`).

    Returns:
        :class:`MeasuresResult`. A measure that needs what the model or data lack (class targets, a last
        linear layer, enough samples for m-sharpness) gets ``None`` and its reason in ``not_applicable``.
    """
    started = time.perf_counter()
    # every rank checks its arguments, then all compare them in one collective before any work: a rank whose
    # argument is wrong or differs makes every rank raise the same error, instead of leaving the others waiting
    error, chosen, settings, objective, agreed = None, [], {}, None, None
    try:
        chosen, settings, objective, agreed = _arguments(
            model, data, names, loss_fn, options, seed, max_batches, check_invariance, invariance_rtol, relu_factor,
            batchnorm_factor, progress)
        _checks.choice(curvature, CURVATURES, "curvature")
    except Exception as exc:  # every rank must reach the comparison, also one whose arguments are wrong
        error = exc
    Ranks.resolve().agree("the arguments of hessgap.measures",
                          (*agreed, curvature) if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error

    batches, samples = _read_batches(objective)
    if curvature != "hessian":  # the result says which matrix its Hessian measures took
        for name in settings:
            if name.startswith(("hessian_", "scaled_")):
                settings[name] = {**settings[name], "curvature": curvature}
    ctx = Context(model, batches, loss_fn=loss_fn, seed=seed, progress=progress, curvature=curvature)
    twins, rescaling, unchecked = [], "", None
    if check_invariance:
        try:
            texts = []
            for alpha, beta in ((relu_factor, batchnorm_factor), (1 / relu_factor, 1 / batchnorm_factor)):
                twin_model, text, output_change = rescaled_copy(model, batches, alpha, beta)
                twins.append(Context(twin_model, batches, loss_fn=loss_fn, seed=seed, curvature=curvature))
                texts.append(f"{text} (outputs changed by {output_change:.1g} of their size)")
            rescaling = "; and ".join(texts)
        except NoSymmetry as exc:
            unchecked = str(exc)
            rescaling = f"none: {exc}"
    else:
        unchecked = "not checked (check_invariance=False)"

    result = MeasuresResult(values={}, invariant={}, settings=settings, seconds={}, rescaling=rescaling,
                            num_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                            num_samples=samples, seed=seed)
    from tqdm.auto import tqdm

    for measure in tqdm(chosen, desc="measures", disable=not progress, leave=False):
        name = measure.name
        kwargs = {k: v for k, v in settings[name].items() if k != "curvature"}  # curvature: the context's
        t0 = time.perf_counter()
        try:
            outcome = measure.fn(ctx, **kwargs)
        except NotApplicable as exc:
            result.values[name], result.invariant[name] = None, None
            result.not_applicable[name] = f"{name} does not apply: {exc}"
            result.seconds[name] = time.perf_counter() - t0
            continue
        result.seconds[name] = time.perf_counter() - t0
        result.values[name], result.stderr[name] = outcome.value, outcome.stderr
        result.details[name], result.notes[name] = outcome.details, outcome.notes
        entry = {"declared": measure.declared}
        if not twins or not math.isfinite(outcome.value):
            result.invariant[name] = None
            entry["reason"] = unchecked or "the value is not finite"
        else:
            t1 = time.perf_counter()
            try:
                others = [measure.fn(twin, **kwargs).value for twin in twins]
            except NotApplicable as exc:  # a measure that depends on the weights' sizes may refuse a copy
                others = None
                result.invariant[name] = None
                entry["reason"] = f"the measure does not apply to a rescaled copy: {exc}"
            result.check_seconds[name] = time.perf_counter() - t1
            if others is not None:
                change = max(_changed(outcome.value, other) for other in others)
                result.invariant[name] = bool(change <= invariance_rtol)
                entry.update(values_rescaled=others, change=change, rtol=invariance_rtol)
        result.invariance[name] = entry
    result.total_seconds = time.perf_counter() - started
    return result
