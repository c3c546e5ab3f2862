"""Tracker: warm-started records agree with cold calls, cost few products, change nothing about the run (bit for
bit), resume from their folder, and on several ranks equal one process on all the data."""

import json
import random
import statistics
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hessgap
from hessgap import HessgapError, Tracker

pytestmark = pytest.mark.usefixtures("one_thread")


def classification(samples=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 10, generator=generator)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return x, y


def mlp(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 3))


def train(model, optimizer, steps, x, y, tracker=None, batch=32):
    """Minibatch training with a shuffled loader and dropout: every random stream matters."""
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)
    step, records = 0, []
    while step < steps:
        for inputs, targets in loader:
            model.train()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if tracker is not None:
                record = tracker.step(step)
                if record is not None:
                    records.append(record)
            if step == steps:
                break
    return records


def test_warm_records_agree_with_cold_calls_and_need_few_products():
    """Along a smooth run: every record within 1e-2 of a cold eigenvalues call at the same weights, a median of at
    most 10 products per record after the first."""
    x, y = classification()
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    tracker = Tracker(model, data, every=10, optimizer=optimizer, measures=("lambda_max", "eos_ratio"))
    warm = []
    for index in range(8):
        train(model, optimizer, 10, x, y)
        record = tracker.step(10 * (index + 1))
        reference = hessgap.eigenvalues(model, data, k=1, tol=1e-3)
        assert record["lambda_max"] == pytest.approx(reference.eigenvalues[0], rel=1e-2)
        assert record["eos_ratio"] == pytest.approx(record["lambda_max"] * 0.1 / 2, rel=1e-12)
        warm.append(record["details"]["lambda_max"]["hvps"])
        assert record["hvps"] == warm[-1]
    assert [r["step"] for r in tracker.history] == list(range(10, 90, 10))
    assert not tracker.history[0]["details"]["lambda_max"]["warm"]
    assert all(r["details"]["lambda_max"]["warm"] for r in tracker.history[1:])
    assert statistics.median(warm[1:]) <= 10
    # a warm record is accepted by its residual, a bound: within tol of an eigenvalue
    assert all(r["details"]["lambda_max"]["residual"] <= 1e-3 * r["lambda_max"] for r in tracker.history[1:])


def test_a_record_holds_every_measure_and_steps_off_the_grid_give_none():
    x, y = classification()
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, optimizer, 5, x, y)
    data = (x[:128], y[:128])
    tracker = Tracker(model, data, every=5, optimizer=optimizer, trace_probes=8,
                      measures=("lambda_max", "trace", "sharpness", "critical_sharpness"))
    assert tracker.step(4) is None and tracker.history == []
    record = tracker.step(5)
    assert set(record) == {"step", "lr", "hvps", "lambda_max", "trace", "critical_sharpness", "sharpness", "loss",
                           "seconds", "weights_checksum", "details"}
    assert record["lr"] == 1e-2 and record["seconds"] > 0
    assert record["hvps"] == record["details"]["lambda_max"]["hvps"] + 8
    # each value is the library's own call on the same data
    assert record["trace"] == pytest.approx(hessgap.trace(model, data, num_probes=8).value, rel=1e-6)
    assert record["sharpness"] == pytest.approx(hessgap.sharpness(model, data).value, rel=1e-6)
    critical = hessgap.critical_sharpness(model, data, optimizer)
    assert record["critical_sharpness"] == pytest.approx(critical.value, rel=0.05)
    model.eval()
    assert record["loss"] == pytest.approx(nn.functional.cross_entropy(model(x[:128]), y[:128]).item(), rel=1e-6)
    record["lambda_max"] = -1.0  # a copy: the history is not the caller's to edit
    assert tracker.history[0]["lambda_max"] > 0


@pytest.mark.parametrize("optimizer_name", ["adam", "sgd"])
def test_a_tracked_run_ends_bit_identical_to_an_untracked_one(optimizer_name):
    x, y = classification()

    def run(tracked):
        model = mlp(dropout=0.3)
        make = {"adam": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01),
                "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)}[optimizer_name]
        optimizer = make(model.parameters())
        random.seed(1)
        np.random.seed(1)
        torch.manual_seed(1)
        tracker = None
        if tracked:
            measures = ["lambda_max", "trace", "sharpness", "critical_sharpness"]
            measures += ["eos_ratio"] if optimizer_name == "sgd" else []
            shuffled = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)  # read under preserved RNG
            tracker = Tracker(model, shuffled, every=4, optimizer=optimizer, measures=measures, trace_probes=4,
                              max_batches=2)
        train(model, optimizer, 12, x, y, tracker)
        if tracker is not None:
            assert len(tracker.history) == 3
        rng = (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state())
        return model, optimizer, rng

    plain_model, plain_optimizer, plain_rng = run(False)
    model, optimizer, rng = run(True)
    for (name, a), b in zip(plain_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert plain_model.training == model.training
    state_a, state_b = plain_optimizer.state_dict(), optimizer.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    for key, entry in state_a["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b["state"][key][name])), name
    assert plain_rng[0] == rng[0] and plain_rng[1] == rng[1] and torch.equal(plain_rng[2], rng[2])


def test_the_run_folder_records_plots_and_resumes(tmp_path):
    x, y = classification()
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(x[:128], y[:128])]
    out = tmp_path / "tracking"
    measures = ("lambda_max", "critical_sharpness")
    tracker = Tracker(model, data, every=3, optimizer=optimizer, measures=measures, out=out)
    train(model, optimizer, 9, x, y, tracker)
    tracker.close()
    lines = (out / "history.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == tracker.history and len(lines) == 3
    assert json.loads((out / "config.json").read_text())["measures"] == list(measures)
    assert (out / "tracking.png").read_bytes()[:4] == b"\x89PNG" and (out / "warm.pt").exists()

    # resumed at the same weights: the stored records come back without measuring
    again = Tracker(model, data, every=6, optimizer=optimizer, measures=measures, out=out)  # every may change
    assert again.history == tracker.history
    assert again.measure(9) == tracker.history[-1]
    assert len((out / "history.jsonl").read_text().splitlines()) == 3
    # the next record starts warm from the saved state
    train(model, optimizer, 3, x, y)
    record = again.measure(12)
    assert record["details"]["lambda_max"]["warm"] and record["details"]["critical_sharpness"]["warm"]
    # another trajectory from step 6 on: its records are dropped and step 6 is measured again
    with torch.no_grad():
        model[0].weight.add_(0.01)
    redone = again.measure(6)
    assert [r["step"] for r in again.history] == [3, 6]
    assert redone["lambda_max"] != tracker.history[1]["lambda_max"]
    again.close()
    assert [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()] == [3, 6]


def test_a_cut_last_line_is_dropped_and_other_settings_are_refused(tmp_path):
    x, y = classification()
    model = mlp()
    out = tmp_path / "t"
    with Tracker(model, (x, y), every=1, out=out) as tracker:
        tracker.step(1)
        tracker.step(2)
    path = out / "history.jsonl"
    path.write_text(path.read_text()[:-20])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = Tracker(model, (x, y), every=1, out=out)
    assert any("incomplete" in str(w.message) for w in caught)
    assert [r["step"] for r in resumed.history] == [1]
    resumed.close()
    with pytest.raises(HessgapError, match="tol=0.001.*this one has tol=0.01"):
        Tracker(model, (x, y), every=1, out=out, tol=1e-2)
    (out / "history.jsonl").write_text("{broken\n" + path.read_text())
    with pytest.raises(HessgapError, match="line 1 is damaged"):
        Tracker(model, (x, y), every=1, out=out)


def test_a_tracker_on_shards_equals_one_process_on_all_data(tmp_path):
    from rank_workers import batches_of, tiny_problem, track_tiny, tracker_on_shards
    from ranks import run_ranks

    out = tmp_path / "ddp"
    results = run_ranks(tracker_on_shards, 2, str(out))
    assert results[0] == results[1]  # every rank holds the very same records
    _, x, y = tiny_problem()
    single = track_tiny(batches_of(x, y))
    for shared, alone in zip(results[0], single):
        for key in ("lambda_max", "trace", "critical_sharpness", "eos_ratio", "loss", "lr"):
            assert shared[key] == pytest.approx(alone[key], rel=1e-6), key
    assert results[0][1]["details"]["lambda_max"]["warm"]
    assert len((out / "history.jsonl").read_text().splitlines()) == 2  # rank 0 alone wrote


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"measures": ("lambda_max", "gap")}, "unknown measure 'gap'"),
        ({"measures": ()}, "measures is empty"),
        ({"measures": ("trace", "trace")}, "one measure twice"),
        ({"measures": ("critical_sharpness",)}, "pass optimizer="),
        ({"measures": ("eos_ratio",), "optimizer": "adam"}, "edge-of-stability ratio of SGD"),
        ({"measures": ("relative_critical_sharpness",), "optimizer": "sgd"}, "pass line_data="),
        ({"line_data": "data"}, "line_data= is for relative_critical_sharpness"),
        ({"every": 0}, "every must be a positive integer"),
        ({"tol": 1.5}, "tol is Lanczos's relative tolerance"),
        ({"optimizer": object()}, "must be a torch.optim.Optimizer"),
    ],
)
def test_bad_arguments(kwargs, message):
    x, y = classification(32)
    model = mlp()
    optimizers = {"adam": torch.optim.Adam(model.parameters()), "sgd": torch.optim.SGD(model.parameters(), lr=0.1)}
    kwargs = {k: optimizers.get(v, v) if k == "optimizer" else v for k, v in kwargs.items()}
    if kwargs.get("line_data") == "data":
        kwargs["line_data"] = (x, y)
    with pytest.raises(HessgapError, match=message):
        Tracker(model, (x, y), **kwargs)


def test_bad_steps():
    x, y = classification(32)
    tracker = Tracker(mlp(), (x, y), every=2)
    with pytest.raises(HessgapError, match="step must be an integer ≥ 0"):
        tracker.step(-1)
    with pytest.raises(HessgapError, match="step must be an integer ≥ 0"):
        tracker.step(2.0)


class Quadratic(nn.Module):
    """f(θ) = ½ θᵀAθ: its Hessian is A wherever θ is."""

    def __init__(self, n):
        super().__init__()
        self.theta = nn.Parameter(torch.ones(n, dtype=torch.float64))

    def forward(self, A):
        return 0.5 * self.theta @ A @ self.theta


def test_a_warm_start_in_a_turned_cluster_still_finds_lambda_max():
    """At the edge of stability the top eigenvalues cluster and their eigenvectors turn between records: the
    previous top Ritz vector is now mostly the eigenvector of the fourth eigenvalue (overlaps as measured on
    an MLP at the edge of stability). Started on it alone, Lanczos accepts 1.909, 5.4 % low; the record
    starts from the previous four Ritz vectors together and finds 2.0181."""
    n, top = 400, [2.0181, 1.9517, 1.9204, 1.9132, 1.8751, 1.7882]
    generator = torch.Generator().manual_seed(0)
    values = torch.tensor(top + list(np.linspace(0.0, 1.2, n - len(top))), dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    A = (Q * values) @ Q.T
    A = (A + A.T) / 2

    def mixed(weights):  # a previous Ritz vector: these eigenvectors' mixture, and a little of everything
        v = Q[:, : len(weights)] @ torch.tensor(weights, dtype=torch.float64)
        v = v + 0.02 * torch.randn(n, generator=generator, dtype=torch.float64)
        return v / v.norm()

    previous = torch.stack([mixed([0.016, 0.062, 0.181, 0.935, 0.203, 0.168]), mixed([0.5, 0.6, 0.3, 0.2, 0.4, 0.1]),
                            mixed([0.3, 0.2, 0.8, 0.1, 0.3, 0.3]), mixed([0.6, 0.2, 0.1, 0.1, 0.5, 0.5])])
    alone = hessgap.eigenvalues(A, k=1, tol=1e-3, start=previous[0])
    assert alone.eigenvalues[0] == pytest.approx(1.909, abs=2e-3)  # the failure this guards against
    tracker = Tracker(Quadratic(n), [(A,)], every=1, compute_loss=lambda m, batch: m(*batch))
    tracker.warm["ritz"] = previous
    record = tracker.step(1)
    assert record["details"]["lambda_max"]["warm"]
    assert record["lambda_max"] == pytest.approx(2.0181, rel=1e-3)
    assert tracker.warm["ritz"].shape == (4, n)


def test_a_warm_record_accepts_by_residual_where_the_gap_estimate_would_stop_at_the_second():
    """A GPT-2 at the edge of stability: the previous Ritz vectors hold little of the new top eigenvector. From
    their combination the default criterion accepts the second eigenvalue (109.9) after 6 products; the record
    accepts by residual and finds the top one (113.94)."""
    n, top = 400, [113.94, 109.89, 97.27, 93.79, 90.1, 85.3]
    generator = torch.Generator().manual_seed(0)
    values = torch.tensor(top + list(np.linspace(-2.0, 40.0, n - len(top))), dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    A = (Q * values) @ Q.T
    A = (A + A.T) / 2

    def mixed(weights):
        v = Q[:, : len(weights)] @ torch.tensor(weights, dtype=torch.float64)
        v = v + 0.01 * torch.randn(n, generator=generator, dtype=torch.float64)
        return v / v.norm()

    previous = torch.stack([mixed([0.03, 0.99, 0.1]), mixed([0.02, 0.1, 0.95, 0.2]), mixed([0.0, 0.05, 0.2, 0.95]),
                            mixed([0.01, 0, 0, 0.2, 0.95])])
    combined = (torch.tensor([1.0, 0.5, 0.5, 0.5], dtype=torch.float64)[:, None] * previous).sum(0)
    by_estimate = hessgap.eigenvalues(A, k=1, tol=1e-3, start=combined, min_iter=5)
    assert by_estimate.eigenvalues[0] == pytest.approx(109.9, abs=0.1)  # the failure this guards against
    tracker = Tracker(Quadratic(n), [(A,)], every=1, compute_loss=lambda m, batch: m(*batch))
    tracker.warm["ritz"] = previous
    record = tracker.step(1)
    assert record["lambda_max"] == pytest.approx(113.94, rel=1e-3)
    assert record["details"]["lambda_max"]["residual"] <= 1e-3 * record["lambda_max"]


def test_a_damaged_or_foreign_warm_start_is_not_loaded(tmp_path):
    import pickle

    x, y = classification(64)
    model = mlp()
    out = tmp_path / "t"
    with Tracker(model, (x, y), every=1, out=out) as tracker:
        tracker.step(1)

    class Payload:
        def __reduce__(self):
            return (print, ("never run",))

    torch.save({"ritz": Payload()}, out / "warm.pt", pickle_module=pickle)
    with pytest.warns(UserWarning, match="will not load it.*starts cold"):
        resumed = Tracker(model, (x, y), every=1, out=out)
    assert resumed.warm == {}
    record = resumed.measure(2)
    assert not record["details"]["lambda_max"]["warm"]
    resumed.close()


def test_a_cold_record_uses_at_most_the_cold_tolerance_and_warm_ones_the_trackers(monkeypatch):
    # the eigenvalue criterion at tol 1e-2 accepted a lower eigenvalue (8 % low) on an MLP at the edge of
    # stability: a cold record never runs looser than 1e-3, a warm one (residual criterion) runs at tol
    from hessgap.tracking import measures as tracking_measures

    calls = []
    original = tracking_measures.eigenvalues

    def spy(*args, **kwargs):
        calls.append((kwargs["tol"], kwargs["criterion"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(tracking_measures, "eigenvalues", spy)
    x, y = classification()
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = Tracker(model, (x, y), every=5, optimizer=optimizer, measures=("lambda_max",), tol=1e-2)
    for step in (5, 10):
        train(model, optimizer, 5, x, y)
        tracker.step(step)
    assert calls == [(tracking_measures.COLD_TOL, "eigenvalue"), (1e-2, "residual")]


def test_the_curvature_matrix_is_a_choice_and_a_folder_keeps_it(tmp_path):
    """curvature="ggn": λmax and the trace are the GGN's (equal to hessgap's own GGN calls); a folder made for the
    GGN refuses a tracker of the Hessian, so one run's records never mix two matrices."""
    x, y = classification()
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, optimizer, 5, x, y)
    data = (x[:128], y[:128])
    tracker = Tracker(model, data, every=5, optimizer=optimizer, measures=("lambda_max", "trace"), curvature="ggn",
                      trace_probes=8, out=tmp_path / "run")
    record = tracker.step(5)
    ggn = hessgap.eigenvalues(model, data, k=1, tol=1e-3, curvature="ggn").eigenvalues[0]
    hessian = hessgap.eigenvalues(model, data, k=1, tol=1e-3).eigenvalues[0]
    assert record["lambda_max"] == pytest.approx(ggn, rel=1e-2)
    assert abs(ggn - hessian) > 1e-2 * abs(hessian)  # the choice matters on this model
    assert record["trace"] == pytest.approx(hessgap.trace(model, data, num_probes=8, curvature="ggn").value, rel=1e-6)
    with pytest.raises(HessgapError):
        Tracker(model, data, every=5, optimizer=optimizer, measures=("lambda_max", "trace"), trace_probes=8,
                out=tmp_path / "run")
    with pytest.raises(HessgapError, match="curvature"):
        Tracker(model, data, curvature="hessain")
