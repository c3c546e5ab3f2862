"""reproduce: every experiment of the paper in one tiny run, its report, resuming it, divergence and bad sizes."""

import json

import pytest

from hessgap.experiments import RunFolder, reproduce

from tiny_runs import tiny_settings

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_experiment_finishes_and_reports(full_run):
    path, settings, outcome = full_run
    assert {name: "error" in result for name, result in outcome.items()} == {name: False for name in settings.experiments}
    for name in settings.experiments:
        assert (path / "results" / f"{name}.json").is_file()
    # finished experiments leave no pieces behind; the per-network sharpness cache stays for later commands
    assert [p.name for p in (path / "results").glob("*.parts.json")] == ["measurements.parts.json"]
    report = (path / "report.md").read_text()
    for section in ("## 1. Generalization gap", "## 2. Sharpness", "## 3. Parametric", "## 4. Batch-size sweep",
                    "## 5. Warm-started", "## 6. Sharpness along training", "## 7. Remedies", "## 8. Top Hessian"):
        assert section in report
    assert "Not finished yet" not in report
    for figure in ("gap", "sharpness", "parametric", "spectrum", "along_training", "sweep", "warmstart", "remedies"):
        assert (path / "figures" / f"{figure}.png").stat().st_size > 1000


def test_rerun_on_a_finished_folder_trains_nothing(full_run, monkeypatch):
    path, settings, first = full_run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished folder must not train again")

    monkeypatch.setattr("hessgap.train.loop.train", no_training)
    folder = RunFolder(path, "reproduce", settings.to_dict(), progress=False).open()
    assert reproduce(folder, settings) == json.loads(json.dumps(first))


def test_rerun_after_losing_a_result_reuses_the_trained_networks(full_run):
    path, settings, first = full_run
    checkpoints = {p: p.stat().st_mtime_ns for p in (path / "models").rglob("*.pt")}
    (path / "results" / "sweep.json").unlink()
    folder = RunFolder(path, "reproduce", settings.replace(experiments=("sweep",)).to_dict(), progress=False).open()
    again = reproduce(folder, settings.replace(experiments=("sweep",)))
    assert again["sweep"]["rows"] == first["sweep"]["rows"]
    assert {p: p.stat().st_mtime_ns for p in (path / "models").rglob("*.pt")} == checkpoints


def test_diverging_runs_are_reported_not_averaged(tmp_path):
    settings = tiny_settings(optimizer="sgd", lr=1e30, seeds=1, experiments=("gap", "parametric"))
    folder = RunFolder(tmp_path, "reproduce", settings.to_dict(), progress=False).open()
    outcome = reproduce(folder, settings)
    rows = outcome["gap"]["rows"]
    assert [r["diverged"] for r in rows] == [1, 1]
    assert outcome["gap"]["summary"]["sb"]["test_acc"] is None
    assert "diverged at epoch 1" in outcome["parametric"]["error"]
    report = (tmp_path / "report.md").read_text()
    assert "diverged at epoch 1" in report and "**parametric failed**: the SB network diverged at epoch 1" in report
    assert list((tmp_path / "models").glob("sb-seed0-*/checkpoints/epoch_0000.pt"))  # checkpoints are kept


def test_batch_larger_than_the_data_is_refused(tmp_path):
    settings = tiny_settings(lb_batch=5000, experiments=("gap",))
    folder = RunFolder(tmp_path, "reproduce", settings.to_dict(), progress=False).open()
    assert "LB batch size 5000 is larger than the training set (1437 samples)" in reproduce(folder, settings)["gap"]["error"]
