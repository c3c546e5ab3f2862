"""Experiment 2 (Tables 3 and 4) in the tiny full run: its table against direct calls of the metric."""

import pytest

import hessgap
from hessgap.experiments import networks

from tiny_runs import load_trained

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sharpness_table_matches_direct_calls(full_run):
    path, settings, outcome = full_run
    rows = outcome["sharpness"]["rows"]
    assert len(rows) == 2 * 2 * 2 * 2  # seeds × regimes × spaces × epsilons
    row = next(r for r in rows if r["regime"] == "lb" and r["space"] == "subspace" and r["epsilon"] == 1e-3 and r["seed"] == 1)
    model = load_trained(path, row["model"]).model
    loader = networks.analysis_loader(settings)
    direct = hessgap.sharpness(model, loader, epsilon=1e-3, subspace_dim=20, seed=1)
    assert row["value"] == pytest.approx(direct.value, rel=1e-6)
    table = outcome["sharpness"]["tables"]["full"]["sb"]["0.001"]
    values = [r["value"] for r in rows if r["regime"] == "sb" and r["space"] == "full" and r["epsilon"] == 1e-3]
    assert table[0] == pytest.approx(sum(values) / 2)
