"""`hessgap measures` on a saved network and `hessgap correlate` on a tiny zoo: output, results, report, the
same numbers as the Python call, and clear exits on bad names and a zoo that reaches no accuracy."""

import json

import pytest

import hessgap
from hessgap.cli import main
from hessgap.experiments.saved import load
from hessgap.train.data import load_dataset, make_loader

RUN = ["--quiet", "--threads", "1", "--device", "cpu"]
ZOO = ["--datasets", "digits", "--widths", "0.06", "--depth", "0.2", "--batch-sizes", "64,512", "--lrs", "0.003",
       "--seeds", "0,1", "--epochs", "2", "--lb-epochs", "3", "--measure-samples", "128",
       "--names", "fisher_rao,gaussian_adaptive,keskar", *RUN]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("measures-cli")
    assert main(["train", "--batch-size", "64", "--epochs", "2", "--width", "0.05", "--out", str(root / "m"), *RUN]) == 0
    return root / "m"


def test_measures_of_a_saved_model_match_the_python_call(saved, tmp_path, capsys):
    code, out, err = run_cli(capsys, "measures", saved, "--names", "fisher_rao,keskar,relative_flatness",
                             "--out", tmp_path / "m", *RUN)
    assert code == 0, err
    result = json.loads((tmp_path / "m" / "results" / "model_measures.json").read_text())
    assert list(result["values"]) == ["fisher_rao", "keskar", "relative_flatness"]
    assert result["invariant"] == {"fisher_rao": True, "keskar": False, "relative_flatness": True}
    model = load(saved / "model.pt").result.model
    direct = hessgap.measures(model, make_loader(load_dataset("digits").train, 1024, shuffle=False), ["fisher_rao"],
                              check_invariance=False)
    assert result["values"]["fisher_rao"] == pytest.approx(direct.values["fisher_rao"], rel=1e-9)
    assert "keskar:" in out and "(not invariant" in out
    assert "## Measures of" in (tmp_path / "m" / "report.md").read_text()


def test_settings_from_the_command_line(saved, tmp_path, capsys):
    code, out, err = run_cli(capsys, "measures", saved, "--names", "keskar", "--set", "keskar.epsilon=5e-4",
                             "--no-invariance", "--out", tmp_path / "m", *RUN)
    assert code == 0, err
    result = json.loads((tmp_path / "m" / "results" / "model_measures.json").read_text())
    assert result["settings"]["keskar"]["epsilon"] == 5e-4 and result["invariant"] == {"keskar": None}
    code, out, err = run_cli(capsys, "correlate", *ZOO, "--set", "keskar.eps=1", "--out", tmp_path / "c")
    assert code == 1 and "has no setting 'eps'" in err and not (tmp_path / "c").exists()
    with pytest.raises(SystemExit):
        main(["measures", str(saved), "--set", "keskar-epsilon"])
    assert "MEASURE.SETTING=VALUE" in capsys.readouterr().err


def test_an_unknown_measure_name_is_a_usage_error(saved, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["measures", str(saved), "--names", "sharpest"])
    assert exit_info.value.code == 2
    assert "unknown measure 'sharpest'" in capsys.readouterr().err


def test_correlate_on_a_tiny_zoo(tmp_path, capsys):
    code, out, err = run_cli(capsys, "correlate", *ZOO, "--min-train-acc", "30", "--out", tmp_path / "c")
    assert code == 0, err
    assert "4 of 4 networks included" in out and "fisher_rao" in out
    assert "sign-error" in out and "(robust" in out
    result = json.loads((tmp_path / "c" / "results" / "correlate.json").read_text())
    assert "robust_sign_error" in result["correlations"]["digits"]["fisher_rao"]
    report = (tmp_path / "c" / "report.md").read_text()
    assert "## Which sharpness predicts the generalization gap?" in report
    assert (tmp_path / "c" / "figures" / "correlate_digits.png").is_file()


def test_correlate_that_reaches_no_accuracy_exits_with_the_reason(tmp_path, capsys):
    code, out, err = run_cli(capsys, "correlate", *ZOO, "--min-train-acc", "100", "--epochs", "1", "--lb-epochs", "1",
                             "--out", tmp_path / "c")
    assert code == 1
    assert "0 of 4 networks included" in out and "no network reached the 100 % training accuracy" in err


def test_correlate_on_cifar_needs_its_folder(tmp_path, capsys):
    code, out, err = run_cli(capsys, "correlate", "--datasets", "cifar10", "--out", tmp_path / "c", *RUN)
    assert code == 1 and "--data-root" in err
    assert not (tmp_path / "c").exists()


def test_the_llc_of_a_saved_model_with_its_options_traces_and_diagnostics(saved, tmp_path, capsys):
    code, out, err = run_cli(capsys, "measures", saved, "--names", "llc", "--llc-chains", "2", "--llc-draws", "20",
                             "--llc-burn-in", "5", "--no-invariance", "--out", tmp_path / "m", *RUN)
    assert code == 0, err
    result = json.loads((tmp_path / "m" / "results" / "model_measures.json").read_text())
    assert result["settings"]["llc"]["chains"] == 2 and result["settings"]["llc"]["draws"] == 20
    llc = result["details"]["llc"]
    assert result["values"]["llc"] == pytest.approx(llc["value"]) and len(llc["traces"]) == 2
    assert (tmp_path / "m" / "figures" / "llc_traces.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "m" / "report.md").read_text()
    assert "### Local learning coefficient" in report and "figures/llc_traces.png" in report
    assert "llc:" in out and "step_size:" in out
