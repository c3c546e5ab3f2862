"""Worker functions for the distributed tests, run on every rank by :func:`ranks.run_ranks`."""

from __future__ import annotations

import torch


def collectives(rank, world_size):
    """Sums, buckets, agreement and failure propagation of hessgap.distributed.Ranks."""
    from hessgap.distributed import Ranks
    from hessgap.errors import HessgapError

    ranks = Ranks.resolve()
    out = {"describe": ranks.describe()}
    t = torch.full((3,), float(rank + 1))
    ranks.sum_(t)
    out["sum"] = t.tolist()
    a, b, c = torch.ones(2, 2) * rank, torch.arange(3.0) + rank, torch.tensor([rank], dtype=torch.float64)
    ranks.sum_bucket_([a, b, c])
    out["bucket"] = [a.tolist(), b.tolist(), c.tolist()]
    out["numbers"] = ranks.sum_numbers([1.0, rank])
    ranks.agree("the answer", 42)
    try:
        ranks.agree("the model's shapes", {"weight": (3, rank)})
        out["disagree"] = None
    except HessgapError as exc:
        out["disagree"] = str(exc)
    try:
        ranks.settle(ValueError("bad batch on the last rank") if rank == world_size - 1 else None)
        out["settle"] = None
    except Exception as exc:  # noqa: BLE001
        out["settle"] = f"{type(exc).__name__}: {exc}"
    ranks.settle(None)  # every rank is still in step afterwards
    return out


def tiny_problem(samples: int = 61):
    """The model and the whole data set every distributed test shards (float64, fixed seeds)."""
    from torch import nn

    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).double()
    with torch.no_grad():
        model.train()
        model(torch.randn(64, 5, dtype=torch.float64) * 2 + 0.5)  # non-trivial running statistics
    model.eval()
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(samples, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (samples,), generator=generator)
    return model, x, y


def batches_of(x, y, size: int = 8):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def shard(rank: int, world_size: int, x, y):
    """Unequal shards: rank r gets a share that grows with r (the last rank the rest)."""
    weights = [r + 1 for r in range(world_size)]
    bounds = [round(len(x) * sum(weights[:r]) / sum(weights)) for r in range(world_size + 1)]
    return x[bounds[rank] : bounds[rank + 1]], y[bounds[rank] : bounds[rank + 1]]


def every_public_call(data, model):
    """What each public call returns on ``data`` (the caller's shard, or all the data in one process)."""
    import hessgap
    from hessgap.curvature.objective import LossOverData

    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(3, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = {
        "loss": LossOverData(model, data).value(),
        "hvp": hessgap.hvp(model, data, V).tolist(),
        "operator": hessgap.HessianOperator(model, data, cache_batches=True).matmat(V).tolist(),
        "sharpness": hessgap.sharpness(model, data, max_iter=4).value,
        "sharpness_lbfgsb": hessgap.sharpness(model, data, solver="lbfgsb", max_iter=3).value,
        "sharpness_subspace": hessgap.sharpness(model, data, subspace_dim=5, max_iter=3).value,
        "adaptive": hessgap.adaptive_sharpness(model, data, max_iter=3).value,
        "eigenvalues": hessgap.eigenvalues(model, data, k=3, tol=1e-9, max_iter=200).eigenvalues,
        "trace": hessgap.trace(model, data, num_probes=6).value,
        "density": hessgap.density(model, data, num_probes=2, lanczos_steps=8).nodes,
        "blocks": hessgap.block_spectrum(model, data, k=1, num_probes=4, tol=1e-8).eigenvalues,
        "landscape": hessgap.landscape(model, data, steps=3, seed=0).loss.tolist(),
        "landscape_accuracy": hessgap.landscape(model, data, dims=1, steps=3, seed=0).accuracy.tolist(),
    }
    return out


def measure_on_shards(rank, world_size):
    model, x, y = tiny_problem()
    xs, ys = shard(rank, world_size, x, y)
    return every_public_call(batches_of(xs, ys), model)


def bad_shards(rank, world_size):
    """An empty shard on the last rank, then ranks that disagree on epsilon: every rank must raise."""
    import hessgap
    from hessgap.errors import HessgapError

    model, x, y = tiny_problem()
    xs, ys = shard(rank, world_size, x, y)
    outcome = {}
    data = [] if rank == world_size - 1 else batches_of(xs, ys)
    try:
        hessgap.trace(model, data, num_probes=2)
        outcome["empty"] = None
    except HessgapError as exc:
        outcome["empty"] = str(exc)
    try:
        hessgap.sharpness(model, batches_of(xs, ys), epsilon=1e-3 * (rank + 1), max_iter=2)
        outcome["disagree"] = None
    except HessgapError as exc:
        outcome["disagree"] = str(exc)
    return outcome


def fsdp_shards_of(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of k parameter-shaped tensors (k, *shape), as FSDP2 shards the parameter's dim 0
    (torch.chunk's split)."""
    rows = -(-full.shape[1] // world_size)
    return full[:, rank * rows : (rank + 1) * rows]


def sharded_hessian(rank, world_size):
    """An FSDP2-sharded model on unequal data shards: H·V (local shards), eigenvalues, trace, density and block
    spectra."""
    from torch.distributed.fsdp import fully_shard

    import hessgap

    model, x, y = tiny_problem()
    reference_model = __import__("copy").deepcopy(model)
    for module in model:
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module)
    fully_shard(model)
    xs, ys = shard(rank, world_size, x, y)
    data = batches_of(xs, ys, size=16)
    shapes = [p.shape for p in reference_model.parameters()]
    n = sum(int(torch.Size(s).numel()) for s in shapes)
    V = torch.randn(2, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pieces = V.split([int(torch.Size(s).numel()) for s in shapes], dim=1)
    local = torch.cat([fsdp_shards_of(piece.reshape((2,) + tuple(s)), rank, world_size).reshape(2, -1)
                       for piece, s in zip(pieces, shapes)], dim=1)
    result = hessgap.hvp(model, data, local, return_info=True)
    eigen = hessgap.eigenvalues(model, data, k=3, tol=1e-8, max_iter=300)
    trace = hessgap.trace(model, data, num_probes=48)
    spectrum = hessgap.density(model, data, num_probes=2, lanczos_steps=40)
    nodes = [x for probe in spectrum.nodes for x in probe]
    blocks = hessgap.block_spectrum(model, data, k=2, tol=1e-8, num_probes=32)
    refused = None
    try:
        hessgap.sharpness(model, data, max_iter=1)
    except hessgap.HessgapError as exc:
        refused = str(exc)
    return {"hv": result.value.tolist(), "path": result.path, "eigenvalues": eigen.eigenvalues,
            "n": eigen.n, "trace": trace.value, "stderr": trace.stderr, "refused": refused,
            "density": {"path": spectrum.path, "n": spectrum.n, "largest": max(nodes), "smallest": min(nodes),
                        "integral": spectrum.integral, "weights": [sum(w) for w in spectrum.weights]},
            "blocks": {"path": blocks.path, "names": blocks.blocks, "sizes": blocks.sizes,
                       "eigenvalues": blocks.eigenvalues, "converged": blocks.converged, "traces": blocks.traces,
                       "stderr": blocks.trace_stderr}}


def _mlp_without_batchnorm(name, input_shape, num_classes, width=1.0, depth=1.0, dropout=0.5, **options):
    """A plain MLP (no BatchNorm: SyncBatchNorm runs on GPUs only, so CPU ranks would normalize apart)."""
    from torch import nn

    features = int(torch.Size(input_shape).numel())
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, num_classes))


def ddp_training(rank, world_size, out_dir, epochs):
    """Train into ``out_dir`` on the default process group; the final weights and history."""
    from hessgap.train import TrainConfig, loop, train

    loop.build_model = _mlp_without_batchnorm  # see the docstring above
    config = TrainConfig(model="F1", dataset="digits", batch_size=100, epochs=epochs, seed=4, sharpness_every=1,
                         sharpness_batches=1, device="cpu")
    result = train(config, out_dir=out_dir, progress=False)
    return {"weights": [p.detach().clone() for p in result.model.parameters()], "history": result.history,
            "resumed_from": result.resumed_from}


#: Small settings for every measure of hessgap.measures on the tiny problem (61 samples: m-sharpness's
#: batches of 8 straddle the shards' boundaries).
MEASURE_OPTIONS = {"m_sharpness": {"m": 8, "batches": 5, "max_iter": 3}, "keskar": {"max_iter": 3},
                   "keskar_subspace": {"subspace_dim": 5, "max_iter": 3}, "adaptive_linf": {"max_iter": 3},
                   "adaptive_l2": {"max_iter": 3}, "gaussian": {"samples": 4}, "gaussian_adaptive": {"samples": 4},
                   "pacbayes_flatness": {"samples": 3}, "pacbayes_mag_flatness": {"samples": 3},
                   "hessian_trace": {"probes": 8}, "scaled_trace": {"probes": 8},
                   "scaled_lmax_over_trace": {"probes": 8}, "relative_flatness": {"probes": 4}}


def trained_problem():
    """The tiny problem's model after a few full-batch ADAM steps on all its data (deterministic), so that
    accuracy-based measures have an accuracy to lose."""
    model, x, y = tiny_problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), x, y


def every_measure(data, model):
    """hessgap.measures with every measure and the invariance check, without its timings."""
    import hessgap

    result = hessgap.measures(model, data, options=MEASURE_OPTIONS).to_dict()
    for key in ("seconds", "check_seconds", "total_seconds"):
        result.pop(key)
    return result


def measures_on_shards(rank, world_size):
    model, x, y = trained_problem()
    xs, ys = shard(rank, world_size, x, y)
    return every_measure(batches_of(xs, ys), model)


def measures_with_bad_arguments(rank, world_size):
    """hessgap.measures with arguments that are wrong or differ on some ranks: what each rank raised."""
    import hessgap
    from hessgap.errors import HessgapError

    model, x, y = tiny_problem()
    data = batches_of(*shard(rank, world_size, x, y))
    last = rank == world_size - 1
    calls = {
        "names": dict(names=["sharpest"] if last else ["fisher_rao"]),
        "steps": dict(names=["keskar"], options={"keskar": {"max_iter": 3 + rank}}),
        "seed": dict(names=["gaussian"], seed=rank),
        "factor": dict(names=["fisher_rao"], relu_factor=4.0 if last else 3.0),
        "type": dict(names=5),
        "vacuous": dict(names=["fisher_rao"], relu_factor=1.0),
    }
    raised = {}
    for what, kwargs in calls.items():
        try:
            hessgap.measures(model, data, **kwargs)
            raised[what] = None
        except HessgapError as exc:
            raised[what] = str(exc)
    # a measure's decision on one rank's shard is every rank's: NotApplicable everywhere, with that reason
    from hessgap.measures.context import Context, NotApplicable

    def step():
        if last:
            raise NotApplicable(f"rank {rank}'s batches are not pairs")
        return rank

    try:
        raised["agreed"] = Context(model, data).agreed(step)
    except NotApplicable as exc:
        raised["agreed"] = f"NotApplicable: {exc}"
    # and the ranks are still in step: a good call after the bad ones
    raised["after"] = hessgap.measures(model, data, ["fisher_rao"], check_invariance=False).values["fisher_rao"]
    return raised


def different_weights(rank, world_size):
    """Models that differ on the last rank in one weight (one ulp, or two elements swapped) or a BatchNorm
    statistic: every public call must raise on every rank, naming the tensor. Also an operator whose
    parameters the last rank replaces by other values after it was built."""
    import hessgap
    from hessgap.errors import HessgapError

    def perturbed(model):
        weight = model[3].weight
        weight[1, 2] = torch.nextafter(weight[1, 2], torch.tensor(10.0, dtype=weight.dtype))

    def swapped(model):
        weight = model[0].weight
        weight[0, 1], weight[0, 2] = weight[0, 2].clone(), weight[0, 1].clone()

    def statistic(model):
        model[1].running_mean[4] += 1e-3

    edits = {"perturbed": perturbed, "swapped": swapped, "statistic": statistic}
    calls = {
        "hvp": lambda model, data, n: hessgap.hvp(model, data, torch.ones(1, n, dtype=torch.float64)),
        "HessianOperator": lambda model, data, n: hessgap.HessianOperator(model, data),
        "eigenvalues": lambda model, data, n: hessgap.eigenvalues(model, data, k=1),
        "trace": lambda model, data, n: hessgap.trace(model, data, num_probes=2),
        "sharpness": lambda model, data, n: hessgap.sharpness(model, data, max_iter=1),
        "landscape": lambda model, data, n: hessgap.landscape(model, data, steps=3),
    }
    outcome = {}
    for edit_name, edit in edits.items():
        for call_name, call in calls.items():
            model, x, y = tiny_problem()
            data = batches_of(*shard(rank, world_size, x, y))
            if rank == world_size - 1:
                with torch.no_grad():
                    edit(model)
            try:
                call(model, data, sum(p.numel() for p in model.parameters()))
                outcome[f"{edit_name} {call_name}"] = None
            except HessgapError as exc:
                outcome[f"{edit_name} {call_name}"] = str(exc)
    model, x, y = tiny_problem()
    data = batches_of(*shard(rank, world_size, x, y))
    operator = hessgap.HessianOperator(model, data)
    if rank == world_size - 1:
        model[3].bias = torch.nn.Parameter(model[3].bias.detach() + 1.0)
    try:
        operator.matvec(torch.ones(operator.n, dtype=torch.float64))
        outcome["replaced"] = None
    except HessgapError as exc:
        outcome["replaced"] = str(exc)
    return outcome


def landscape_on_ranks(rank, world_size, out_dir):
    """hessgap.landscape on unequal shards: ranks that disagree on an argument, a rank without data, then a run
    folder written, resumed, and refused when one rank's shard changed. Every outcome is recorded per rank."""
    import hessgap
    from hessgap.errors import HessgapError

    model, x, y = tiny_problem()
    data = batches_of(*shard(rank, world_size, x, y))
    outcome = {}

    def attempt(name, **options):
        try:
            outcome[name] = hessgap.landscape(model, options.pop("data", data), **options)
        except HessgapError as exc:
            outcome[name] = f"HessgapError: {exc}"

    attempt("steps", steps=3 + rank)  # rank 1's grid is larger: its sums would not match
    attempt("directions", steps=3, directions="random" if rank == 0 else "hessian")
    attempt("no data", steps=3, data=None if rank == world_size - 1 else data)
    attempt("written", steps=3, out=out_dir)
    attempt("resumed", steps=3, out=out_dir)
    if rank == world_size - 1:
        data = data[:-1]  # one batch fewer on the last rank
    attempt("other shard", steps=3, out=out_dir)
    return {name: value if isinstance(value, str) else {"loss": value.loss.tolist(), "resumed": value.rows_resumed}
            for name, value in outcome.items()}


def track_tiny(data, out_dir=None):
    """Two records of a Tracker on ``data`` (a shard, or all the data), the weights moved between them by an
    SGD step on the whole data's gradient (the same on every rank); returns the records."""
    import hessgap

    model, x, y = tiny_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    tracker = hessgap.Tracker(model, data, every=5, optimizer=optimizer, out=out_dir, tol=1e-8, critical_tol=1e-6,
                              measures=("lambda_max", "trace", "critical_sharpness", "eos_ratio"), trace_probes=4)
    records = [tracker.step(0)]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()))):
        p.grad = g
    optimizer.step()
    records.append(tracker.step(5))
    tracker.close()
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def tracker_on_shards(rank, world_size, out_dir):
    _, x, y = tiny_problem()
    xs, ys = shard(rank, world_size, x, y)
    return track_tiny(batches_of(xs, ys), out_dir)


#: The LLC's settings on the distributed tests' problem (float64, explicit so no Lanczos sets them).
LLC_SETTINGS = dict(step_size=1e-3, localization=1.0, chains=3, draws=12, burn_in=3)


def llc_problem():
    """64 samples of the trained tiny problem, in 4 batches of 8 per rank for 2 ranks (the shards in rank
    order), and the one-process batches that are the union of both ranks' batch j."""
    model, x, y = trained_problem()
    x, y = x[:64], y[:64]
    shards = [(x[r * 32:(r + 1) * 32], y[r * 32:(r + 1) * 32]) for r in range(2)]
    per_rank = [batches_of(*shard) for shard in shards]
    unions = [(torch.cat([per_rank[0][j][0], per_rank[1][j][0]]), torch.cat([per_rank[0][j][1], per_rank[1][j][1]]))
              for j in range(4)]
    return model, per_rank, unions


def llc_result(model, data):
    import hessgap

    r = hessgap.llc(model, data, **LLC_SETTINGS).to_dict()
    return {k: r[k] for k in ("value", "per_chain", "traces", "loss_traces", "step_units", "n_beta", "units",
                              "lmax", "diagnostics")}


def llc_on_shards(rank, world_size):
    model, per_rank, _ = llc_problem()
    return llc_result(model, per_rank[rank])


def llc_with_a_bad_batch(rank, world_size):
    """The last rank's second batch has a target out of the classes' range: what each rank raised."""
    import hessgap

    model, per_rank, _ = llc_problem()
    data = list(per_rank[rank])
    if rank == world_size - 1:
        data[1] = (data[1][0], data[1][1].clone().fill_(7))
    try:
        hessgap.llc(model, data, **LLC_SETTINGS)
    except hessgap.HessgapError as exc:
        return str(exc)
    return None


def sharded_batch_failing_on_one_rank(rank, world_size):
    """An FSDP2-sharded model whose last rank holds a batch that does not fit it: every rank must raise."""
    import time

    from torch.distributed.fsdp import fully_shard

    import hessgap

    model, x, y = tiny_problem()
    for module in model:
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module)
    fully_shard(model)
    xs, ys = shard(rank, world_size, x, y)
    data = batches_of(xs[:, :4] if rank == world_size - 1 else xs, ys, size=16)  # 4 features for 5
    started = time.perf_counter()
    try:
        hessgap.trace(model, data, num_probes=2)
        outcome = None
    except hessgap.HessgapError as exc:
        outcome = str(exc)
    return outcome, time.perf_counter() - started


def gauss_newton_matrices(data, model):
    """The GGN and both Fishers of ``model`` over ``data`` as explicit matrices (lists)."""
    from hessgap.curvature.gauss_newton import FisherOperator, GGNOperator

    operators = {"ggn": GGNOperator(model, data), "empirical": FisherOperator(model, data, kind="empirical"),
                 "true": FisherOperator(model, data, kind="true", samples=3, seed=5)}
    return {name: op.matmat(torch.eye(op.n, dtype=torch.float64)).tolist() for name, op in operators.items()}


def gauss_newton_on_shards(rank, world_size):
    model, x, y = tiny_problem()
    xs, ys = shard(rank, world_size, x, y)
    return gauss_newton_matrices(batches_of(xs, ys), model)
