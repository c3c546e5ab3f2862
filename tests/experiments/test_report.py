"""report.md and the figures, from results written by hand (no training): contents, paper numbers, PNGs."""

import json

import pytest

from hessgap._io import write_json
from hessgap.experiments import (
    _figures,
    along_training,
    gap,
    paper,
    parametric,
    sharpness_tables,
    spectrum,
    sweep,
    warmstart,
)
from hessgap.experiments.gap import summarize
from hessgap.experiments.report import render, write_report
from hessgap.experiments.runs import RunFolder

PNG = b"\x89PNG\r\n\x1a\n"


def _settings(**changes):
    settings = {"model": "F1", "dataset": "digits", "width": 0.5, "depth": 1.0, "epochs": 3, "sb_batch": 16,
                "lb_batch": 700, "seeds": 2, "epsilons": [1e-3, 5e-4], "subspace_dim": 100,
                "sharpness_solver": "box-ascent", "sharpness_batches": None, "eval_batch": 1024,
                "experiments": ["gap", "sharpness", "parametric", "spectrum"]}
    settings.update(changes)
    return settings


def _gap_result():
    rows = [
        {"seed": 0, "regime": "sb", "batch_size": 16, "epochs": 3, "diverged": None, "model": "sb0",
         "train_loss": 0.01, "train_acc": 99.0, "test_loss": 0.1, "test_acc": 97.0, "distance_from_start": 12.0},
        {"seed": 0, "regime": "lb", "batch_size": 700, "epochs": 3, "diverged": None, "model": "lb0",
         "train_loss": 0.02, "train_acc": 98.0, "test_loss": 0.2, "test_acc": 95.0, "distance_from_start": 3.0},
        {"seed": 1, "regime": "sb", "batch_size": 16, "epochs": 3, "diverged": None, "model": "sb1",
         "train_loss": 0.01, "train_acc": 100.0, "test_loss": 0.1, "test_acc": 98.0, "distance_from_start": 12.0},
        {"seed": 1, "regime": "lb", "batch_size": 700, "epochs": 2, "diverged": 2, "model": "lb1"},
    ]
    result = {"experiment": "gap", "settings": _settings(), "rows": rows, "summary": summarize(rows),
              "paper": {k: list(v) for k, v in paper.TABLE2["F1"].items()}, "figures": {"gap": "gap.png"}}
    return result


def _sharpness_result():
    tables = {
        "full": {"sb": {"0.001": [2.0, 0.5], "0.0005": [1.0, 0.1]}, "lb": {"0.001": [50.0, 5.0], "0.0005": [20.0, 2.0]}},
        "subspace": {"sb": {"0.001": [0.5, 0.1], "0.0005": [0.2, 0.0]}, "lb": {"0.001": [4.0, 1.0], "0.0005": [1.0, 0.5]}},
    }
    return {"experiment": "sharpness", "settings": _settings(), "epsilons": [1e-3, 5e-4], "rows": [], "tables": tables,
            "paper": {"full": {"sb": {"0.001": [1.23, 0.83], "0.0005": [0.61, 0.27]},
                               "lb": {"0.001": [205.14, 69.52], "0.0005": [42.90, 17.14]}}},
            "figures": {"sharpness": "sharpness.png"}}


def test_gap_summary_statistics_and_divergence():
    summary = _gap_result()["summary"]
    assert summary["sb"]["test_acc"] == pytest.approx((97.5, 0.7071067811865476))  # sample std, ddof = 1
    assert summary["lb"]["test_acc"] == (95.0, 0.0)
    assert summary["lb"]["runs"] == 1 and summary["lb"]["diverged"] == [1]
    assert summary["test_gap"] == (2.0, 0.0)  # only seed 0 has both networks
    assert summary["distance_ratio"] == (4.0, 0.0)


def test_report_puts_the_run_beside_the_paper(tmp_path):
    folder = RunFolder(tmp_path, "reproduce", _settings()).open()
    folder.save_result("gap", _gap_result())
    folder.save_result("sharpness", _sharpness_result())
    text = write_report(tmp_path).read_text()
    assert text.startswith("# hessgap report: `reproduce`")
    # the paper's Table 2 and Table 3 rows for F1, beside this run's numbers
    assert "98.03 ± 0.07" in text and "97.81 ± 0.07" in text and "205.14 ± 69.52" in text
    assert "97.50 ± 0.71" in text and "95.00 ± 0.00" in text
    assert "diverged at epoch 2" in text and "**LB diverged** for seeds [1]" in text
    # LB/SB ratios: this run 50 / 2 = 25×, the paper 205.14 / 1.23 = 166.8×
    assert "25.0×" in text and "166.8×" in text
    assert "![accuracy of SB and LB](figures/gap.png)" in text
    # experiments named in the settings but without results are listed as unfinished
    assert "Not finished yet: parametric, spectrum" in text
    assert text.index("## 1. Generalization gap") < text.index("## 2. Sharpness")


def test_report_is_rebuilt_from_the_folder_alone(tmp_path):
    folder = RunFolder(tmp_path, "reproduce", _settings()).open()
    folder.save_result("gap", _gap_result())
    first = render(tmp_path)
    assert render(tmp_path) == first
    parts = folder.parts("sharpness")  # unfinished pieces are not results
    parts.put("x", {"value": 1.0})
    assert "## 2. Sharpness" not in render(tmp_path)


def test_parametric_spectrum_and_remedies_sections(tmp_path):
    folder = RunFolder(tmp_path, "reproduce", _settings()).open()
    alphas = [-1.0, 0.0, 1.0, 2.0]
    curve = {"alpha": alphas, "train_loss": [5.0, 0.01, 0.02, None], "test_loss": [5.0, 0.1, 0.2, None],
             "train_acc": [10.0, 99.0, 98.0, None], "test_acc": [10.0, 97.0, 95.0, None],
             "clamped_variances": [3, 0, 0, 7]}
    folder.save_result("parametric", {"experiment": "parametric", "models": {"sb": "a", "lb": "b"},
                                      "curves": {"linear": curve}, "batchnorm": "eval mode", "figures": {}})
    folder.save_result("spectrum", {"experiment": "spectrum", "epsilon": 1e-3, "k": 2, "top_ratio_lb_sb": 4.0,
                                    "models": {"sb": {"eigenvalues": [1.0, 0.5], "sharpness": 2.0, "loss": 0.01, "hvps": 10},
                                               "lb": {"eigenvalues": [4.0, 2.0], "sharpness": 50.0, "loss": 0.02, "hvps": 12}}})
    folder.save_result("remedies", {"experiment": "remedies", "epsilon": 1e-3, "dynamic_schedule": [16, 700, 1.5],
                                    "rows": [{"name": "LB + augment", "remedy": "augment", "train_acc": [99.0, 0.1],
                                              "test_acc": [96.0, 0.2], "sharpness": [30.0, 1.0], "diverged": [],
                                              "paper_test_lb": 82.5, "paper_sharpness_lb": 231.77, "paper_note": None}]})
    text = render(tmp_path)
    assert "| -1 | 5 | 5 | 10.00 | 10.00 | 3 |" in text  # clamped BatchNorm variances are shown
    assert "| 2 | – | – | – | – | 7 |" in text  # a non-finite loss is a dash, not a number
    assert "1, 0.5" in text and "λ_max(LB) / λ_max(SB) = 4" in text
    assert "82.5" in text and "231.8" in text and "batch 16 grown ×1.5" in text


@pytest.mark.parametrize("lb_top, explained", [(0.5, True), (4.0, False)])
def test_spectrum_section_explains_a_disagreement_with_sharpness(tmp_path, lb_top, explained):
    folder = RunFolder(tmp_path, "reproduce", _settings()).open()
    folder.save_result("spectrum", {"experiment": "spectrum", "epsilon": 1e-3, "k": 1, "top_ratio_lb_sb": lb_top,
                                    "models": {"sb": {"eigenvalues": [1.0], "sharpness": 2.0, "loss": 0.01},
                                               "lb": {"eigenvalues": [lb_top], "sharpness": 50.0, "loss": 0.02}}})
    text = render(tmp_path)
    assert (" ".join(spectrum.DISAGREEMENT.split()) in " ".join(text.split())) is explained


def test_figures_are_png_files(tmp_path):
    gap_result = _gap_result()
    sharp = _sharpness_result()
    curve = {"alpha": [-1.0, 0.0, 1.0], "train_loss": [1.0, 0.1, None], "test_loss": [1.0, 0.2, 0.3],
             "train_acc": [50.0, 99.0, None], "test_acc": [40.0, 97.0, 96.0]}
    written = [
        gap.plot(gap_result, tmp_path / "gap.png"),
        sharpness_tables.plot(sharp, tmp_path / "sharp.png"),
        parametric.plot({"curves": {"linear": curve, "curved": curve}}, tmp_path / "param.png"),
        sweep.plot({"epsilons": [1e-3], "rows": [{"batch_size": 16, "test_acc": 97.0, "sharpness": {"0.001": 2.0}},
                                                  {"batch_size": 64, "diverged": 3, "sharpness": {}}]}, tmp_path / "s.png"),
        warmstart.plot({"epsilons": [1e-3], "rows": [{"warm_epoch": 0, "test_acc": 95.0, "sharpness": {"0.001": 9.0}}]},
                        tmp_path / "w.png"),
        along_training.plot({"epsilon": 1e-3, "curves": {"sb": [{"epoch": 1, "train_loss": 1.0, "sharpness": 2.0}],
                                                          "lb": []}}, tmp_path / "a.png"),
        spectrum.plot({"models": {"sb": {"eigenvalues": [2.0, -0.1], "sharpness": 1.0}}}, tmp_path / "e.png"),
        _figures.history({"sb": [{"epoch": 1, "train_loss": 1.0, "test_loss": 1.1, "train_acc": 0.5, "test_acc": 0.4}]},
                      tmp_path / "h.png"),
    ]
    for path in written:
        assert path.read_bytes()[:8] == PNG


def test_results_json_is_strict(tmp_path):
    write_json(tmp_path / "r.json", {"a": float("inf"), "b": (1, float("nan")), "c": 2.5})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": None, "b": [1, None], "c": 2.5}
