"""The demo's summary: what it prints, and the one line that explains when sharpness and the Hessian disagree."""

import pytest

from hessgap.experiments.demo import summary_lines
from hessgap.experiments.spectrum import DISAGREEMENT


def _results(lb_sharpness: float, top_ratio: float) -> dict:
    full = {"sb": {"0.001": [2.0, 0.1]}, "lb": {"0.001": [lb_sharpness, 0.3]}}
    spectrum = {"models": {"sb": {"eigenvalues": [10.0, 5.0]}, "lb": {"eigenvalues": [10.0 * (top_ratio or 1.0), 1.0]}},
                "top_ratio_lb_sb": top_ratio}
    return {"sharpness": {"epsilons": [1e-3], "tables": {"full": full}}, "spectrum": spectrum}


def test_opposite_directions_are_explained_in_one_place():
    lines = summary_lines(_results(lb_sharpness=23.8, top_ratio=0.101))  # LB 11.9× sharper, λ_max 10× smaller
    assert "sharpness (full space, ε=0.001): SB 2 ± 0.1, LB 23.8 ± 0.3 (LB / SB = 11.9)" in lines
    assert "largest eigenvalue LB / SB: 0.101" in lines
    text = "\n".join(lines)
    assert DISAGREEMENT in text and text.endswith(DISAGREEMENT)
    assert 1 <= DISAGREEMENT.count("\n") + 1 <= 2  # one or two lines
    for words in ("ε·√n", "quadratic region", "p(1−p)", "BatchNorm's scale symmetry"):
        assert words in DISAGREEMENT


@pytest.mark.parametrize("lb_sharpness, top_ratio", [(23.8, 3.0), (1.0, 0.5), (23.8, None)])
def test_agreeing_or_missing_ratios_need_no_explanation(lb_sharpness, top_ratio):
    assert DISAGREEMENT not in "\n".join(summary_lines(_results(lb_sharpness, top_ratio)))


def test_every_figure_is_mean_and_std_over_the_seeds():
    summary = {
        "sb": {"runs": 2, "diverged": [], "batch_size": 16, "train_acc": [96.83, 0.25], "test_acc": [70.35, 0.78],
               "train_loss": [0.1513, 0.014]},
        "lb": {"runs": 2, "diverged": [], "batch_size": 2000, "train_acc": [100.0, 0.0], "test_acc": [61.7, 1.41],
               "train_loss": [0.00055, 2e-6]},
        "test_gap": [8.65, 0.64], "distance_ratio": [5.25, 0.045],
    }
    gap = {"summary": summary, "settings": {"model": "F1", "width": 0.5, "dataset": "mnist1d"}}
    lines = summary_lines({"gap": gap, **_results(2369.0, 0.262)})
    assert lines[0] == "F1 (width ×0.5) on mnist1d, 2 seeds: mean ± std over the seeds"
    assert lines[1] == "SB (batch   16): train accuracy 96.83 ± 0.25 %, test accuracy 70.35 ± 0.78 %, train loss 0.151 ± 0.014"
    assert "generalization gap (test SB − test LB): 8.65 ± 0.64 points" in lines
    assert "‖x_SB − x0‖ / ‖x_LB − x0‖ = 5.25 ± 0.04 (paper: 3 to 10)" in lines
