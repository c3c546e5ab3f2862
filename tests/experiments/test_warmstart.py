"""Experiment 5 (Figure 5) in the tiny full run: the LB runs start at the SB iterates."""

import pytest
import torch

from hessgap.experiments.warmstart import warm_epochs
from hessgap.train.checkpoint import load_epoch_state

pytestmark = pytest.mark.usefixtures("one_thread")


def test_warm_starts_begin_at_the_sb_iterates(full_run):
    path, settings, outcome = full_run
    result = outcome["warmstart"]
    assert [r["warm_epoch"] for r in result["rows"]] == warm_epochs(settings) == [0, 1, 2]
    sb_dir = path / "models" / result["sb_model"]
    for row in result["rows"][1:]:
        start = load_epoch_state(path / "models" / row["model"], 0)
        iterate = load_epoch_state(sb_dir, row["warm_epoch"])
        for key in iterate:
            assert torch.equal(start[key], iterate[key]), key
