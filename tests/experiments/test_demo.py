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
    assert "sharpness (full space, ε=0.001): SB 2, LB 23.8 (LB / SB = 11.9)" in lines
    assert "largest eigenvalue LB / SB: 0.101" in lines
    text = "\n".join(lines)
    assert DISAGREEMENT in text and text.endswith(DISAGREEMENT)
    assert 1 <= DISAGREEMENT.count("\n") + 1 <= 2  # one or two lines
    for words in ("ε·√n", "quadratic region", "p(1−p)", "BatchNorm's scale symmetry"):
        assert words in DISAGREEMENT


@pytest.mark.parametrize("lb_sharpness, top_ratio", [(23.8, 3.0), (1.0, 0.5), (23.8, None)])
def test_agreeing_or_missing_ratios_need_no_explanation(lb_sharpness, top_ratio):
    assert DISAGREEMENT not in "\n".join(summary_lines(_results(lb_sharpness, top_ratio)))
