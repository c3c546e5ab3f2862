"""Experiment 1 (Table 2) in the tiny full run: its numbers against an independent evaluation."""

import math

import pytest
import torch

from hessgap.train.data import load_dataset

from tiny_runs import load_trained

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gap_numbers_match_an_independent_evaluation(full_run):
    path, settings, outcome = full_run
    data = load_dataset("digits")
    x, y = data.test.tensors
    for row in outcome["gap"]["rows"]:
        model = load_trained(path, row["model"]).model.eval()
        with torch.no_grad():
            accuracy = 100 * (model(x).argmax(1) == y).double().mean().item()
        assert row["test_acc"] == pytest.approx(accuracy)
        assert row["batch_size"] == (64 if row["regime"] == "sb" else 512)
        assert row["epochs"] == (2 if row["regime"] == "sb" else 3)
    summary = outcome["gap"]["summary"]
    sb = [r["test_acc"] for r in outcome["gap"]["rows"] if r["regime"] == "sb"]
    assert summary["sb"]["test_acc"][0] == pytest.approx(sum(sb) / 2)
    assert summary["sb"]["test_acc"][1] == pytest.approx(abs(sb[0] - sb[1]) / math.sqrt(2))
