"""ε-sharpness (Keskar et al. 2017, Metric 2.1) and adaptive sharpness (Andriushchenko et al. 2023).

    φ_{x,f}(ε, A) = ( max_{y ∈ C_ε} f(x + A y) − f(x) ) / (1 + f(x)) × 100,
    C_ε = { y : |y_i| ≤ ε (|(A⁺x)_i| + 1) }

with f the mean loss over the data and A = I (full space) or a random n × p matrix (subspace; see
:mod:`hessgap.sharp.subspace` for its distribution). Adaptive sharpness is
max_{‖δ ⊙ |x|⁻¹‖_p ≤ ρ} f(x + δ) − f(x), p ∈ {∞, 2}, without the (1 + f) normalization.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import _checks
from .._results import JsonResult
from .._state import preserved
from ..curvature.objective import REDUCED_PRECISION, LossFn, LossOverData
from ..errors import HessgapError, NonFiniteError
from ..ops.box_ascent import box_radius
from . import solvers
from .epsilon import check_box, too_large
from .spaces import FullSpace, ScaledSpace, SubspaceSpace
from .subspace import SCALES, RandomSubspace

KINDS = ("keskar", "adaptive")
NORMS = ("linf", "l2")
DEFAULT_MAX_ITER = 10  # the paper's 10 iterations, for every solver
DEFAULT_RHO = {"linf": 2e-3, "l2": 0.1}
DEFAULT_SUBSPACE_DIM = 100


@dataclass(repr=False)
class SharpnessResult(JsonResult):
    """The outcome of :func:`sharpness`; every field is a plain number, string or list (JSON-ready).

    ``value`` is the metric: Keskar's φ in percent for ``kind="keskar"``, the loss increase
    ``max_loss − loss`` for ``kind="adaptive"``. ``loss`` is f(x), ``max_loss`` the largest f found in
    the box (≥ ``loss``). ``epsilon`` is ε (Keskar) or ρ (adaptive). ``solver`` names the solvers that
    ran (``"lbfgsb+box-ascent"`` for ``"auto"``: see :func:`hessgap.sharp.solvers.resolve`),
    ``solver_requested`` the one asked for, ``solver_values`` the metric each solver reached on its own
    (``value`` is the largest) and ``best_solver`` the one that reached ``value``. ``evaluations`` counts
    passes of loss and gradient over the data, f(x) included, ``evaluation_seconds`` the time they took
    (the rest of ``seconds`` is the solvers' own work); ``history`` lists f at each of them.
    """

    value: float
    loss: float
    max_loss: float
    epsilon: float
    subspace_dim: int | None
    solver: str
    solver_requested: str
    iterations: int
    evaluations: int
    seconds: float
    evaluation_seconds: float = 0.0
    kind: str = "keskar"
    norm: str = "linf"
    num_parameters: int = 0
    num_samples: int | None = None
    train_mode: bool = False
    seed: int = 0
    max_batches: int | None = None
    kernel: str = ""
    restarts: int = 0
    message: str = ""
    history: list[float] = field(default_factory=list)
    solver_values: dict[str, float] = field(default_factory=dict)
    best_solver: str = ""

    def __str__(self) -> str:
        space = "full space" if self.subspace_dim is None else f"{self.subspace_dim}-dim subspace"
        unit = "" if self.kind == "adaptive" else " (Metric 2.1, %)"
        return (
            f"{self.kind} sharpness{unit} = {self.value:.6g} at eps={self.epsilon:g}, {space}, "
            f"loss {self.loss:.6g} -> {self.max_loss:.6g}, {self._solver_text()}, {self.evaluations} evaluations, "
            f"{self.seconds:.2f}s"
        )

    def _solver_text(self) -> str:
        if self.solver_requested == self.solver:
            return self.solver
        return f"{self.solver} ({self.solver_requested})"


def _check_buffers(model: nn.Module, objective: LossOverData) -> None:
    """Buffers (BatchNorm statistics) must live with the parameters; torch's own error would be obscure."""
    for name, b in model.named_buffers():
        if b.device != objective.device:
            raise HessgapError(
                f"buffer {name} is on {b.device} but the parameters are on {objective.device}; "
                "move the whole model with model.to(device)"
            )
        if b.is_floating_point() and b.dtype != objective.dtype:
            raise HessgapError(
                f"buffer {name} is {b.dtype} but the parameters are {objective.dtype}; "
                "cast the whole model with model.to(dtype)"
            )


def sharpness(
    model: nn.Module,
    data,
    epsilon: float = 1e-3,
    *,
    subspace_dim: int | bool | None = None,
    loss_fn: LossFn | None = None,
    solver: str = "auto",
    max_iter: int | None = None,
    seed: int = 0,
    max_batches: int | None = None,
    train_mode: bool = False,
    progress: bool = False,
    kind: str = "keskar",
    norm: str = "linf",
    momentum: float = 0.0,
    tol: float = 3e-4,
    subspace_scale: str = "unit",
    subspace_memory_bytes: int | None = None,
    cache_batches: bool = False,
    lbfgsb_options: dict | None = None,
    compute_loss=None,
    weight_fn=None,
    params=None,
    group=None,
) -> SharpnessResult:
    """ε-sharpness of ``model`` at its current weights x over ``data`` (Metric 2.1).

    Args:
        model: the network; its weights, buffers, gradients and train/eval modes are restored bit for bit
            on return, also when the call raises or is interrupted.
        data: a DataLoader or any iterable of batches, or one batch (``(inputs, targets)`` pairs, tuples of
            several inputs and targets, mappings passed as ``model(**batch)``); f is the mean loss over
            every unit (sample or counted token) of all of it. Batches are moved to the model's device, and
            floating inputs cast to its dtype.
        epsilon: the box size ε (ρ for ``kind="adaptive"``).
        subspace_dim: None for the full space (A = I); p for a random n × p matrix A; True for the
            paper's p = 100. A has i.i.d. N(0, 1) entries (``subspace_scale``) drawn from ``seed`` and is
            held when it fits ``subspace_memory_bytes`` (default: a quarter of the free memory), else
            regenerated block by block at every product, so the extra memory stays a small multiple of
            the parameters' size for any p (about 5× slower).
        loss_fn: ``loss_fn(outputs, targets)`` → mean loss of a batch; cross-entropy by default.
        solver: ``"auto"`` (default), ``"box-ascent"``, ``"lbfgsb"`` or ``"lbfgsb-scipy"``. ``"box-ascent"``
            is projected sign ascent from the box corner sign(∇f)·r, with Auto-PGD's step halving and the
            best point kept, using the fused op; ``"lbfgsb"`` is L-BFGS-B from y = 0, the paper's method,
            taking scipy's iterates on the model's device (``momentum`` and ``tol`` do not apply to it);
            ``"lbfgsb-scipy"`` is scipy's own, for reference. ``"auto"`` runs L-BFGS-B's path and then the
            sign ascent and keeps the larger value, so it never reports less than the paper's method
            (see :func:`hessgap.sharp.solvers.resolve`). All return the largest f they evaluated, a lower
            bound of the true maximum.
        max_iter: at most this many iterations of each solver; 10 by default, the paper's (a box-ascent step
            is one pass of loss and gradient; an L-BFGS-B iteration may take several).
        seed: seeds the random subspace A and the tie-breaking of zero gradients.
        max_batches: limit f to the first batches of ``data``, for speed.
        train_mode: evaluate in train mode (BatchNorm on batch statistics, dropout on); the default is
            eval mode, as Andriushchenko et al. BatchNorm buffers are restored either way.
        progress: show a tqdm progress bar over the iterations.
        kind: ``"keskar"`` (Metric 2.1) or ``"adaptive"`` (see :func:`adaptive_sharpness`).
        norm: ``"linf"`` or ``"l2"`` (adaptive only).
        momentum: the weight of the previous step (Auto-PGD's 1 − α; 0.25 is its α = 0.75). The default
            0 climbed about twice as fast over the first steps on F1-sized nets.
        tol: box-ascent stops when a step raises f by less than ``tol`` times the gain so far (0: run
            all ``max_iter`` steps).
        subspace_scale: ``"unit"``: A has i.i.d. N(0, 1) entries; ``"sqrt_n"``: N(0, 1/n).
        subspace_memory_bytes: keep A in memory when it fits in this many bytes, else regenerate it block by
            block at every product (same numbers, slower); None: a quarter of the device's free memory.
        cache_batches: keep the loader's batches in memory across the passes.
        lbfgsb_options: extra ``options`` for scipy's L-BFGS-B; by default it runs exactly ``max_iter``
            iterations (``gtol = ftol = 0``): scipy's default ``gtol=1e-5`` stops it at y = 0 on any
            well-trained model, whose gradient is that small.
        compute_loss, weight_fn: the batch's loss and weight for other batch structures (see
            :class:`hessgap.HessianOperator`).
        params: move only these parameters (names, tensors or modules); the others stay at x.
        group: a torch.distributed process group (default: the default group when one is initialized):
            each rank passes its own shard and every rank gets the sharpness over all the data.

    Half-precision models (float16, bfloat16) are refused: a move of ε(|x| + 1) = 1e-3 relative is below
    bfloat16's spacing (2⁻⁷ of a weight) and about float16's (2⁻¹⁰), so the moved weights would round back.

    Returns:
        :class:`SharpnessResult`.
    """
    started = time.perf_counter()
    _checks.choice(kind, KINDS, "sharpness kind")
    _checks.choice(norm, NORMS, "norm")
    if kind == "keskar" and norm != "linf":
        raise HessgapError("Keskar's sharpness is defined on a box (norm='linf'); norm='l2' needs kind='adaptive'")
    ran = solvers.resolve(solver, subspace_dim, norm)
    size_name = "rho" if kind == "adaptive" else "epsilon"
    epsilon = _checks.positive_number(
        epsilon, size_name, f"{size_name} sets the size of the neighbourhood (the paper uses 1e-3, 5e-4)"
    )
    max_iter = _checks.positive_int(DEFAULT_MAX_ITER if max_iter is None else max_iter, "max_iter")
    momentum = _checks.in_unit_interval(momentum, "momentum")
    if subspace_dim is not None and kind == "adaptive":
        raise HessgapError("adaptive sharpness is defined in the full space; leave subspace_dim=None")
    if subspace_scale not in SCALES:
        raise HessgapError(f"subspace_scale must be one of {SCALES}, got {subspace_scale!r}")
    tol = _checks.in_unit_interval(tol, "tol")
    _checks.seed(seed)

    if subspace_dim is True:
        subspace_dim = DEFAULT_SUBSPACE_DIM
    objective = LossOverData(model, data, loss_fn=loss_fn, compute_loss=compute_loss, weight_fn=weight_fn,
                             max_batches=max_batches, params=params, group=group)
    objective.refuse_sharded("sharpness")
    if objective.dtype in REDUCED_PRECISION:
        raise HessgapError(
            f"sharpness moves the weights by ε(|x| + 1) = {epsilon:g} relative, below what {objective.dtype} resolves "
            f"(its spacing is {torch.finfo(objective.dtype).eps:g} of a weight), so the moved weights would round back "
            "to x; measure a float32 copy instead: hessgap.sharpness(copy.deepcopy(model).float(), ...)"
        )
    _check_buffers(model, objective)
    objective.check_finite_parameters()
    n = objective.num_parameters
    objective.agree_across_ranks("the arguments of hessgap.sharpness", epsilon, subspace_dim, ran, max_iter, seed, kind,
                                 norm)
    subspace = None
    if subspace_dim is not None:
        subspace = RandomSubspace(
            n,
            subspace_dim,
            seed,
            device=objective.device,
            dtype=objective.dtype,
            scale=subspace_scale,
            memory_bytes=subspace_memory_bytes,
        )

    from tqdm.auto import tqdm

    with preserved(model, train_mode=train_mode) as snapshot:
        x = [snapshot[name] for name in objective.names]
        if cache_batches:
            objective.cache_batches()
        box = "adaptive" if kind == "adaptive" else "keskar"
        if subspace is not None:
            space = SubspaceSpace(objective, x, subspace)
        elif norm == "l2":
            space = ScaledSpace(objective, x)
        else:
            space = FullSpace(objective, x)
        objective.ranks.together(check_box, space.box_centre, epsilon, box, objective.dtype, size_name)
        loss0, grad0 = space.evaluate()  # f(x): also the first check of the data and of finiteness
        num_samples = objective.num_samples() if cache_batches else None  # free only when cached
        outcomes = {}
        try:
            with tqdm(total=max_iter * len(ran), disable=not progress, desc=f"sharpness ({'+'.join(ran)})",
                      leave=False) as bar:
                for name in ran:
                    best_before = space.best
                    space.best = loss0  # each solver's own maximum, from y = 0
                    if name.startswith("lbfgsb"):
                        radii = [box_radius(c, epsilon, box) for c in space.box_centre]
                        outcome = solvers.lbfgsb(
                            space, [-r for r in radii], radii, loss0, grad0, max_iter=max_iter,
                            options=lbfgsb_options, tick=lambda: bar.update(1),
                            engine="scipy" if name == "lbfgsb-scipy" else "torch",
                        )
                    else:
                        step_rule = (
                            solvers.L2Step(space, epsilon) if norm == "l2" else solvers.LinfStep(space, epsilon, box)
                        )
                        outcome = solvers.box_ascent(
                            space, step_rule, loss0, grad0, max_iter=max_iter, momentum=momentum, tol=tol,
                            seed=seed, tick=lambda: bar.update(1),
                        )
                    outcomes[name] = outcome
                    space.best = max(best_before, space.best)
        except NonFiniteError as exc:  # finite at x (loss0), so the box reaches where the network overflows
            raise too_large(space, epsilon, box, loss0, grad0, objective.dtype, size_name,
                            corner=norm == "linf") from exc
        history = list(space.history)
        evaluations, evaluation_seconds = space.evaluations, space.evaluation_seconds

    def metric(max_loss: float) -> float:
        return max_loss - loss0 if kind == "adaptive" else (max_loss - loss0) / (1.0 + loss0) * 100.0

    best_solver = max(outcomes, key=lambda name: outcomes[name].max_loss)
    outcome = outcomes[best_solver]
    max_loss = max(outcome.max_loss, loss0)
    value = metric(max_loss)
    return SharpnessResult(
        value=value,
        loss=loss0,
        max_loss=max_loss,
        epsilon=epsilon,
        subspace_dim=subspace_dim,
        solver="+".join(ran),
        solver_requested=solver,
        iterations=sum(o.iterations for o in outcomes.values()),
        evaluations=evaluations,
        seconds=time.perf_counter() - started,
        evaluation_seconds=evaluation_seconds,
        kind=kind,
        norm=norm,
        num_parameters=n,
        num_samples=num_samples,
        train_mode=bool(train_mode),
        seed=seed,
        max_batches=max_batches,
        kernel="+".join(o.kernel for o in outcomes.values()),
        restarts=sum(o.restarts for o in outcomes.values()),
        message="; ".join(f"{name}: {o.message}" for name, o in outcomes.items() if o.message),
        history=history,
        solver_values={name: metric(max(o.max_loss, loss0)) for name, o in outcomes.items()},
        best_solver=best_solver,
    )


def adaptive_sharpness(
    model: nn.Module,
    data,
    rho: float | None = None,
    norm: str = "linf",
    *,
    loss_fn: LossFn | None = None,
    solver: str = "auto",
    max_iter: int | None = None,
    **kwargs,
) -> SharpnessResult:
    """Adaptive worst-case sharpness (Andriushchenko et al. 2023): max_{‖δ ⊙ |x|⁻¹‖ ≤ ρ} f(x + δ) − f(x).

    ``norm="linf"``: the box |δ_i| ≤ ρ|x_i| (default ρ = 2e-3); ``norm="l2"``: the ball
    ‖δ / |x|‖₂ ≤ ρ over all coordinates together (default ρ = 0.1). Coordinates with x_i = 0 cannot move.
    No (1 + f) normalization: ``value`` is the loss increase. Other arguments as :func:`sharpness`.
    """
    _checks.choice(norm, NORMS, "norm")
    return sharpness(
        model,
        data,
        epsilon=DEFAULT_RHO[norm] if rho is None else rho,
        loss_fn=loss_fn,
        solver=solver,
        max_iter=max_iter,
        kind="adaptive",
        norm=norm,
        **kwargs,
    )
