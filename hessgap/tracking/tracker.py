"""Curvature inside anyone's training loop: :class:`Tracker` measures λmax, the trace, Metric 2.1, critical
sharpness or SGD's edge-of-stability ratio every N steps, cheaply (warm-started from its previous record), and
changes nothing about the run.

    tracker = hessgap.Tracker(model, batches, every=50, measures=("lambda_max", "critical_sharpness"),
                              optimizer=optimizer, out="runs/curvature")
    for step, batch in enumerate(loader, 1):
        ...                                  # forward, backward, optimizer.step()
        record = tracker.step(step)          # a dict on the steps it measures, None on the others
    tracker.close()

A record holds ``step``, one entry per measure, ``loss`` (the loss over the tracked data at that step), ``lr``
(with an optimizer), ``hvps`` (the Hessian-vector products it took), ``seconds`` and ``details`` (per measure:
products, passes, residuals, whether it started warm). ``tracker.history`` is the list of records.

Nothing changes: the weights, buffers, gradients and train/eval modes come back bit for bit
(:func:`hessgap.preserved`), the optimizer and its state are never touched (its next update is computed on a
copy: :mod:`.update`), and the random generators of Python, numpy and torch are put back
(:func:`hessgap._state.preserved_rng`), so a run with the tracker ends bit-identical to one without.

The tracked data are read once, when the tracker is made (the first ``max_batches`` batches), and every record
measures the same function on them. On several ranks (a default process group) each rank passes its shard,
every rank gets the same record (the measures sum over the shards) and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from .. import _checks
from .._state import preserved, preserved_rng
from ..curvature.gauss_newton import curvature_operator
from ..curvature.objective import LossOverData
from ..curvature.operator import HessianOperator
from ..distributed import Ranks
from ..errors import HessgapError
from ..names import CURVATURES, SHARPNESS_SOLVERS, TRACK_MEASURES
from .folder import TrackerFolder
from .measures import MEASURES, NEEDS_LINE_DATA, NEEDS_OPTIMIZER
from .update import gd_stability_factor, learning_rate, unwrap_optimizer

#: Relative difference of the weights' checksums that counts as other weights (the sums are float64).
SAME_WEIGHTS = 1e-12


class Tracker:
    """Measure the curvature of ``model`` over ``data`` every ``every`` steps of its training.

    Args:
        model: the network being trained (a ``DistributedDataParallel`` wrapper is unwrapped).
        data: the batches the measures average over: a DataLoader, a list of batches or one batch, read once
            (its first ``max_batches`` batches); on several ranks, this rank's shard.
        every: measure at the steps that are multiples of it.
        measures: any of ``lambda_max`` (top Hessian eigenvalue, Lanczos warm-started from the previous
            record's top Ritz vectors), ``trace`` (Hutchinson, ``trace_probes`` probes), ``sharpness`` (Metric 2.1
            at ``epsilon``), ``critical_sharpness`` (λc = 2/ηc along the optimizer's next update, see
            :mod:`hessgap.tracking.critical`), ``relative_critical_sharpness`` (along that update, the loss
            over ``line_data``), ``eos_ratio`` (SGD only: λmax·η over its stability limit, 2 for plain SGD).
        optimizer: the training's optimizer (for critical sharpness, the edge-of-stability ratio and the
            records' ``lr``); never changed.
        out: a folder for the records (JSONL), the figure and the warm-start state; a tracker made on the same
            folder resumes (see :mod:`hessgap.tracking.folder`).
        tol: Lanczos's relative tolerance. A warm record accepts its eigenvalue by the Ritz residual (a
            bound on the distance to *an* eigenvalue); at 1e-3 that was the top one in every measured record,
            at 1e-2 a warm start in a cluster sometimes settled on the second (3.5 % low on a GPT-2 at the edge
            of stability) for a median of 7 products instead of 11 (benchmarks/RESULTS.md). A cold record uses
            at most 1e-3.
        critical_tol: the line search's relative tolerance on ηc.
        warm_start: start each record from the previous one (False: every record cold, for comparison).
        seed: the random start vectors, probes and subspaces.
        loss_fn, compute_loss, weight_fn, max_batches, params, train_mode, path, group: as in
            :class:`hessgap.HessianOperator`.
        curvature: the matrix ``lambda_max``, ``trace`` and ``eos_ratio`` measure: ``"hessian"`` (default),
            ``"ggn"``, ``"empirical-fisher"`` or ``"true-fisher"`` (:func:`hessgap.curvature.gauss_newton.curvature_operator`).
    """

    def __init__(self, model: nn.Module, data, *, every: int = 100, measures=("lambda_max",), optimizer=None,
                 out=None, line_data=None, tol: float = 1e-3, trace_probes: int = 16, epsilon: float = 1e-3,
                 sharpness_solver: str = "auto", critical_tol: float = 0.02, warm_start: bool = True, seed: int = 0,
                 loss_fn=None, compute_loss=None, weight_fn=None, max_batches: int | None = None, params=None,
                 train_mode: bool = False, path: str = "auto", group=None, curvature: str = "hessian"):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # measure the module itself: DDP's hooks belong to the training
        if not isinstance(model, nn.Module):
            raise HessgapError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.every = _checks.positive_int(every, "every", "the number of steps between records")
        self.measures = _measure_names(measures)
        self.optimizer = optimizer
        self._check_needs(optimizer, line_data)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
            raise HessgapError(f"tol is Lanczos's relative tolerance and must lie in (0, 1), got {tol!r}")
        self.tol, self.critical_tol = float(tol), _checks.positive_number(critical_tol, "critical_tol")
        self.trace_probes = _checks.positive_int(trace_probes, "trace_probes")
        self.epsilon = _checks.positive_number(epsilon, "epsilon", "Metric 2.1's box size")
        self.sharpness_solver = _checks.choice(sharpness_solver, SHARPNESS_SOLVERS, "sharpness solver")
        self.warm_start = _checks.flag(warm_start, "warm_start")
        self.seed = _checks.seed(seed)
        self.train_mode, self.hvp_path = _checks.flag(train_mode, "train_mode"), path
        self.curvature = _checks.choice(curvature, CURVATURES, "curvature")
        self._options = dict(loss_fn=loss_fn, compute_loss=compute_loss, weight_fn=weight_fn, params=params,
                             group=group)
        self.ranks = Ranks.resolve(group)
        with preserved_rng(self._devices()):  # reading a shuffled loader draws from torch's generator
            self.batches = self._read(data, max_batches)
            self.line_batches = self._read(line_data, max_batches) if line_data is not None else None
        self.history: list[dict] = []
        self.warm: dict = {}
        self._operator: HessianOperator | None = None
        self.folder = None
        if out is not None:
            self.folder = TrackerFolder(out, self._settings(max_batches), writer=self.ranks.rank == 0)
            self.history, self.warm = self.folder.load()

    # -- set-up ---------------------------------------------------------------------------------------

    def _check_needs(self, optimizer, line_data) -> None:
        needing = [m for m in self.measures if m in NEEDS_OPTIMIZER]
        if needing and optimizer is None:
            raise HessgapError(f"{', '.join(needing)} follow{'s' if len(needing) == 1 else ''} the optimizer's "
                               "update: pass optimizer=the training's optimizer")
        if optimizer is not None:
            unwrap_optimizer(optimizer)
        if "eos_ratio" in self.measures:
            gd_stability_factor(optimizer)  # SGD only: says so at once, not at the first record
        needing = [m for m in self.measures if m in NEEDS_LINE_DATA]
        if needing and line_data is None:
            raise HessgapError("relative_critical_sharpness searches along the update on other data: pass line_data=")
        if line_data is not None and not needing:
            raise HessgapError("line_data= is for relative_critical_sharpness; add it to measures or drop line_data")

    def _read(self, data, max_batches):
        """The data's first ``max_batches`` batches, moved to the model's device, read now and kept."""
        objective = LossOverData(self.model, data, max_batches=max_batches, **self._options)
        objective.cache_batches()
        return list(objective.source)

    def _devices(self) -> list[torch.device]:
        return sorted({p.device for p in self.model.parameters()}, key=str)

    def _settings(self, max_batches) -> dict:
        return {"measures": list(self.measures), "every": self.every, "tol": self.tol, "critical_tol": self.critical_tol,
                "trace_probes": self.trace_probes, "epsilon": self.epsilon, "sharpness_solver": self.sharpness_solver,
                "seed": self.seed, "max_batches": max_batches, "train_mode": self.train_mode,
                "world_size": self.ranks.world_size,
                # only when not the Hessian: folders written before the choice existed still resume
                **({"curvature": self.curvature} if self.curvature != "hessian" else {})}

    def data_options(self) -> dict:
        """The keywords every measure passes on: what the loss is and over which parameters."""
        return {**self._options, "train_mode": self.train_mode}

    def operator(self) -> HessianOperator:
        """The curvature operator over the tracked data (the Hessian unless ``curvature=``), made once: its products
        follow the weights as they change."""
        if self._operator is None:
            self._operator = curvature_operator(self.curvature, self.model, self.batches, train_mode=self.train_mode,
                                                path=self.hvp_path, **self._options)
        return self._operator

    # -- records --------------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether ``step`` is one the tracker measures."""
        return step % self.every == 0

    def step(self, step: int) -> dict | None:
        """Call after the optimizer's step number ``step``: the record when the step is due, else None.

        A step recorded already (a resumed run) gives its stored record when the weights are the ones it was
        measured at; when they are not (the run took another path since), the records from that step on are
        dropped and the step is measured again.
        """
        step = _checks.nonnegative_int(step, "step", "the number of optimizer steps taken so far")
        if not self.due(step):
            return None
        return self.measure(step)

    def measure(self, step: int) -> dict:
        """Measure now, whether or not ``step`` is due; see :meth:`step`."""
        step = _checks.nonnegative_int(step, "step")
        weights = self._weights_checksum()
        stored = next((r for r in self.history if r["step"] == step), None)
        if stored is not None and _same(stored.get("weights_checksum"), weights):
            return copy.deepcopy(stored)
        later = [r for r in self.history if r["step"] >= step]
        if later:  # another trajectory from here on: its records no longer describe this run
            self.history = [r for r in self.history if r["step"] < step]
            if self.folder is not None:
                self.folder.rewrite(self.history)
        record = self._record(step, weights)
        self.history.append(record)
        if self.folder is not None:
            self.folder.append(record)
            self.folder.save(self.history, self.warm)
        return copy.deepcopy(record)

    def _record(self, step: int, weights: list[float]) -> dict:
        started = time.perf_counter()
        record: dict = {"step": step}
        if self.optimizer is not None:
            record["lr"] = learning_rate(self.optimizer)
        record["hvps"] = 0
        details: dict = {}
        with preserved_rng(self._devices()):
            for name, measure in MEASURES.items():
                if name in self.measures or (name == "lambda_max" and "eos_ratio" in self.measures):
                    record[name], details[name] = measure(self, record)
            if "loss" not in record:
                record["loss"] = self._loss()
        record["seconds"] = time.perf_counter() - started
        record["weights_checksum"] = weights
        record["details"] = details
        return record

    def _loss(self) -> float:
        """The loss over the tracked data now: free when a Hessian product just passed over it."""
        if self._operator is not None and self._operator.last_loss is not None:
            return self._operator.last_loss
        with preserved(self.model, train_mode=self.train_mode, parameters=False):
            return LossOverData(self.model, self.batches, **self._options).value()

    def _weights_checksum(self) -> list[float]:
        """Σθ and Σθ² over the parameters, in float64: tells a resumed run's weights from another run's."""
        with torch.no_grad():
            params = [p for p in self.model.parameters()]
            total = sum(p.double().sum() for p in params)
            squares = sum(p.double().pow(2).sum() for p in params)
        return [float(total), float(squares)]

    def close(self) -> None:
        """Write the warm-start state and release the run folder (a tracker with ``out`` holds its lock)."""
        if self.folder is not None:
            self.folder.close(self.warm)
            self.folder = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tracker(every={self.every}, measures={self.measures}, records={len(self.history)})"


def _measure_names(measures) -> tuple[str, ...]:
    if isinstance(measures, str):
        measures = (measures,)
    try:
        names = tuple(measures)
    except TypeError:
        raise HessgapError(f"measures must be a list of names from {', '.join(TRACK_MEASURES)}, got {measures!r}") from None
    if not names:
        raise HessgapError(f"measures is empty; choose from {', '.join(TRACK_MEASURES)}")
    for name in names:
        _checks.choice(name, TRACK_MEASURES, "measure")
    if len(set(names)) != len(names):
        raise HessgapError(f"measures names one measure twice: {names}")
    return names


def _same(stored, current: list[float]) -> bool:
    if not isinstance(stored, list) or len(stored) != len(current):
        return False
    return all(abs(a - b) <= SAME_WEIGHTS * max(abs(a), abs(b), 1e-300) for a, b in zip(stored, current))
