"""Experiment 6 (Figure 6) in the tiny full run: sharpness along training and the distance ratio."""

import pytest
import torch

from tiny_runs import load_trained

pytestmark = pytest.mark.usefixtures("one_thread")


def test_along_training_and_distance_ratio(full_run):
    path, settings, outcome = full_run
    result = outcome["along_training"]
    assert [p["epoch"] for p in result["curves"]["sb"]] == [1, 2]
    assert [p["epoch"] for p in result["curves"]["lb"]] == [1, 2, 3]
    sb = load_trained(path, result["models"]["sb"])
    lb = load_trained(path, result["models"]["lb"])
    torch.testing.assert_close(sb.x0, lb.x0)  # one seed, one start
    d_sb = (torch.nn.utils.parameters_to_vector(sb.model.parameters()) - sb.x0).norm()
    d_lb = (torch.nn.utils.parameters_to_vector(lb.model.parameters()) - lb.x0).norm()
    assert result["distance_ratio"] == pytest.approx((d_sb / d_lb).item(), rel=1e-5)
