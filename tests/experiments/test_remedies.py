"""Experiment 7 (Appendix E) in the tiny full run: one row per remedy beside plain SB and LB."""

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_remedies_rows(full_run):
    path, settings, outcome = full_run
    names = [r["name"] for r in outcome["remedies"]["rows"]]
    assert names == ["SB", "LB", "LB + augment", "LB + conservative", "LB + adversarial", "LB + dynamic"]
    start, final, growth = outcome["remedies"]["dynamic_schedule"]
    assert (start, final) == (64, 512) and growth == pytest.approx(8 ** (1 / 1))
