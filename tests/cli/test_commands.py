"""The `hessgap` commands: a train → sharpness → spectrum → interpolate pipeline, a tiny reproduce run and
its resumption, sweep and warm start, and clear exits on bad data, devices, divergence and interruptions."""

import json

import pytest

import hessgap
from hessgap.cli import main
from hessgap.experiments.saved import load
from hessgap.train.data import load_dataset, make_loader

TINY = ["--width", "0.02", "--quiet", "--threads", "1", "--device", "cpu"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for name, batch in (("sb", 64), ("lb", 512)):
        code = main(["train", "--batch-size", str(batch), "--epochs", "2", "--out", str(root / name), *TINY])
        assert code == 0
    return root


def test_train_writes_a_model_and_a_report(trained_pair):
    folder = trained_pair / "sb"
    assert (folder / "model.pt").is_file() and (folder / "report.md").is_file()
    assert len(list((folder / "checkpoints").glob("epoch_*.pt"))) == 3  # x0 and two epochs
    result = json.loads((folder / "results" / "train.json").read_text())
    assert result["config"]["batch_size"] == 64 and len(result["history"]) == 2
    report = (folder / "report.md").read_text()
    assert "## Training run" in report
    assert f"| test_acc (%) | {100 * result['final']['test_acc']:.2f} |" in report


def test_train_tracks_curvature_into_the_report(tmp_path, capsys):
    folder = tmp_path / "tracked"
    code, out, err = run_cli(capsys, "train", "--batch-size", 256, "--epochs", 2, "--optimizer", "sgd", "--lr", 0.05,
                             "--track", "lambda_max,critical_sharpness,eos_ratio", "--track-every", 3,
                             "--track-batches", 1, "--eval-batch", 200, "--out", folder, *TINY)
    assert code == 0, err
    result = json.loads((folder / "results" / "train.json").read_text())
    steps = [r["step"] for r in result["tracking"]]
    assert steps == [3, 6, 9, 12]  # 6 steps an epoch (1437 samples in batches of 256)
    assert f"at step 12: lambda_max {result['tracking'][-1]['lambda_max']:.4g}" in out
    report = (folder / "report.md").read_text()
    assert "### Curvature along training (every 3 steps" in report and "figures/tracking.png" in report
    assert (folder / "figures" / "tracking.png").is_file()
    assert (folder / "tracking" / "history.jsonl").read_text().count("\n") == 4
    # the model's curvature over the first 200 training samples, as the tracker measured it
    model = load(folder / "model.pt").result.model
    x, y = load_dataset("digits").train.tensors
    direct = hessgap.eigenvalues(model, (x[:200], y[:200]), k=1, tol=1e-4)
    assert result["tracking"][-1]["lambda_max"] == pytest.approx(direct.eigenvalues[0], rel=1e-2)


def test_train_refuses_eos_ratio_with_adam(tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "--epochs", 1, "--track", "eos_ratio", "--out", tmp_path / "t", *TINY)
    assert code == 1 and "eos_ratio is SGD's" in err and not (tmp_path / "t").exists()


def test_train_again_on_the_same_folder_resumes(trained_pair, capsys, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in (trained_pair / "sb" / "checkpoints").glob("*.pt")}
    code, out, err = run_cli(capsys, "train", "--batch-size", 64, "--epochs", 2, "--out", trained_pair / "sb", *TINY)
    assert code == 0 and "after epoch 2" in out
    assert {p: p.stat().st_mtime_ns for p in (trained_pair / "sb" / "checkpoints").glob("*.pt")} == before


def test_sharpness_of_a_saved_model_matches_a_direct_call(trained_pair, tmp_path, capsys):
    code, out, err = run_cli(capsys, "sharpness", trained_pair / "lb", "--epsilon", "1e-3", "--subspace-dim", "10",
                             "--out", tmp_path / "s", "--quiet", "--threads", 1)
    assert code == 0, err
    result = json.loads((tmp_path / "s" / "results" / "model_sharpness.json").read_text())
    assert [m["space"] for m in result["measurements"]] == ["full", "10-dim subspace"]
    model = load(trained_pair / "lb" / "model.pt").result.model
    loader = make_loader(load_dataset("digits").train, 1024, shuffle=False)
    direct = hessgap.sharpness(model, loader, epsilon=1e-3)
    assert result["measurements"][0]["value"] == pytest.approx(direct.value, rel=1e-6)
    assert f"{direct.value:.5g}" in out
    assert "## Sharpness of" in (tmp_path / "s" / "report.md").read_text()


def test_spectrum_and_interpolate_of_saved_models(trained_pair, tmp_path, capsys):
    code, out, err = run_cli(capsys, "spectrum", trained_pair / "sb", "--k", 2, "--trace", "--probes", 8, "--density",
                             "--out", tmp_path / "e", "--quiet", "--threads", 1)
    assert code == 0, err
    result = json.loads((tmp_path / "e" / "results" / "model_spectrum.json").read_text())
    assert len(result["eigenvalues"]) == 2 and result["eigenvalues"][0] >= result["eigenvalues"][1]
    assert "top eigenvalues:" in out and "trace:" in out
    assert (tmp_path / "e" / "figures" / "density.png").is_file() and len(result["density"]["grid"]) > 10
    code, out, err = run_cli(capsys, "interpolate", trained_pair / "sb", trained_pair / "lb", "--points", 5,
                             "--out", tmp_path / "i", "--quiet", "--threads", 1)
    assert code == 0, err
    result = json.loads((tmp_path / "i" / "results" / "parametric.json").read_text())
    assert result["curves"]["linear"]["alpha"] == [-1.0, -0.25, 0.5, 1.25, 2.0]
    assert set(result["curves"]) == {"linear", "curved"}
    assert (tmp_path / "i" / "figures" / "parametric.png").is_file()


def test_landscape_of_a_saved_model_then_towards_another(trained_pair, tmp_path, capsys):
    from hessgap.experiments import networks
    from hessgap.experiments.saved import settings_for

    code, out, err = run_cli(capsys, "landscape", trained_pair / "sb", "--steps", 3, "--test", "--out", tmp_path / "l",
                             "--quiet", "--threads", 1, "--device", "cpu")
    assert code == 0, err
    result = json.loads((tmp_path / "l" / "results" / "landscape.json").read_text())
    # the plane's centre is the saved network itself: its loss over the training set, as LossOverData measures it
    saved = load(trained_pair / "sb")
    data = networks.analysis_loader(settings_for(saved.result))
    centre = hessgap.LossOverData(saved.result.model.eval(), data).value()
    assert result["loss"][1][1] == pytest.approx(centre, rel=1e-5)
    assert "lowest training loss" in out and (tmp_path / "l" / "figures").is_dir()
    code, out, err = run_cli(capsys, "landscape", trained_pair / "sb", "--steps", 3, "--test", "--out", tmp_path / "l",
                             "--quiet", "--threads", 1, "--device", "cpu")
    assert code == 0 and "3 row(s) resumed" in out
    # other batches (32 samples each, the first one only) are other data: named, not mixed with the finished rows
    code, out, err = run_cli(capsys, "landscape", trained_pair / "sb", "--steps", 3, "--test", "--out", tmp_path / "l",
                             "--eval-batch", 32, "--max-batches", 1, "--quiet", "--threads", 1, "--device", "cpu")
    assert code == 1 and "Traceback" not in err
    assert ("changed: data_settings ({'eval_batch': 1024} in the folder, {'eval_batch': 32} now); max_batches (None "
            "in the folder, 1 now); the data (the batches'") in err and "the test data" in err
    code, out, err = run_cli(capsys, "landscape", trained_pair / "sb", "--directions", trained_pair / "lb",
                             "--steps", 4, "--out", tmp_path / "p", "--quiet", "--threads", 1, "--device", "cpu")
    assert code == 0, err
    line = json.loads((tmp_path / "p" / "results" / "landscape.json").read_text())
    assert line["x"] == [-1.0, 0.0, 1.0, 2.0] and line["loss"][1] == pytest.approx(centre, rel=1e-5)


def test_reproduce_then_resume_without_training(tmp_path, capsys, monkeypatch):
    argv = ["reproduce", "--experiments", "gap,sharpness,parametric", "--epochs", "2", "--lb-epochs", "2",
            "--seeds", "1", "--sb-batch", "64", "--lb-batch", "512", "--subspace-dim", "0", "--epsilons", "1e-3",
            "--alphas", "5", "--out", tmp_path, *TINY]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "sharpness (full space, ε=0.001)" in out and "report:" in out
    report = (tmp_path / "report.md").read_text()
    assert "## 1. Generalization gap" in report and "## 3. Parametric" in report

    def no_training(*args, **kwargs):
        raise AssertionError("a finished folder must not train again")

    monkeypatch.setattr("hessgap.train.loop.train", no_training)
    code, again, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert again == out


def test_reproduce_on_a_folder_of_other_settings_is_refused(tmp_path, capsys):
    argv = ["reproduce", "--experiments", "gap", "--epochs", "1", "--lb-epochs", "1", "--seeds", "1", "--sb-batch", "512",
            "--lb-batch", "1024", "--out", tmp_path, *TINY]
    assert run_cli(capsys, *argv)[0] == 0
    argv[argv.index("--epochs") + 1] = "3"
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and "holds results of different settings" in err and "epochs: 1 in the folder, 3 now" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("dataset, expected", [
    ("mnist", "train-images-idx3-ubyte"),
    ("cifar10", "data_batch_1"),
])
def test_data_directory_without_the_files(dataset, expected, tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "--dataset", dataset, "--data-root", tmp_path / "data",
                             "--out", tmp_path / "run", *TINY)
    assert code == 1
    assert expected in err and str(tmp_path / "data") in err and "Traceback" not in err


def test_batch_larger_than_the_data(tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "--batch-size", 5000, "--out", tmp_path, *TINY)
    assert code == 1 and "batch size 5000 is larger than the training set of digits (1437 samples)" in err


def test_diverging_run_stops_reports_and_keeps_checkpoints(tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "--optimizer", "sgd", "--lr", "1e30", "--batch-size", 256,
                             "--epochs", 3, "--out", tmp_path, *TINY)
    assert code == 1
    assert "training diverged at epoch 1" in err and "checkpoints" in err
    assert (tmp_path / "checkpoints" / "epoch_0000.pt").is_file()
    assert "Diverged at epoch 1" in (tmp_path / "report.md").read_text()


def test_corrupt_checkpoint_is_named(tmp_path, capsys):
    argv = ["train", "--batch-size", 512, "--epochs", 1, "--out", tmp_path, *TINY]
    assert run_cli(capsys, *argv)[0] == 0
    (tmp_path / "checkpoints" / "epoch_0001.pt").write_bytes(b"not a checkpoint")
    argv[argv.index("--epochs") + 1] = 2
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and "epoch_0001.pt is corrupt" in err and "Traceback" not in err
    assert (tmp_path / "history.json").is_file() and (tmp_path / "model.pt").is_file()  # finished results stay


def test_missing_model_path(tmp_path, capsys):
    code, out, err = run_cli(capsys, "sharpness", tmp_path / "nothing", "--quiet")
    assert code == 1 and "no saved model at" in err
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "spectrum", tmp_path / "empty", "--quiet")
    assert code == 1 and "without model.pt or checkpoints/" in err


def test_unusable_device_fails_before_any_work(tmp_path, capsys):
    code, out, err = run_cli(capsys, "demo", "--device", "tpu", "--out", tmp_path / "d", "--quiet")
    assert code == 1 and "unknown device 'tpu'" in err
    assert not (tmp_path / "d").exists()


def test_interrupted_training_exits_130_and_resumes(tmp_path, capsys, monkeypatch):
    import hessgap.train.loop as loop

    real = loop.train

    def interrupted(config, **kwargs):
        def stop(record, model):
            if record["epoch"] == 1:
                raise KeyboardInterrupt

        return real(config, **{**kwargs, "epoch_callback": stop})

    monkeypatch.setattr(loop, "train", interrupted)
    argv = ["train", "--batch-size", 512, "--epochs", 2, "--out", tmp_path, *TINY]
    code, out, err = run_cli(capsys, *argv)
    assert code == 130 and "rerun the same command to resume" in err
    first = (tmp_path / "checkpoints" / "epoch_0001.pt").stat().st_mtime_ns
    assert not (tmp_path / "checkpoints" / "epoch_0002.pt").exists()
    resumed = []
    monkeypatch.setattr(loop, "train", lambda config, **kw: resumed.append(real(config, **kw)) or resumed[-1])
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "after epoch 2" in out
    assert resumed[0].resumed_from == 1  # continued from the checkpoint, not from scratch
    assert (tmp_path / "checkpoints" / "epoch_0001.pt").stat().st_mtime_ns == first


def test_sweep_and_warmstart_commands(tmp_path, capsys):
    common = ["--epochs", "1", "--lb-epochs", "1", "--sb-batch", "256", "--lb-batch", "1024", "--epsilons", "1e-3",
              "--subspace-dim", "0", *TINY]
    code, out, err = run_cli(capsys, "sweep", "--sweep-batches", "256,1024", "--out", tmp_path / "s", *common)
    assert code == 0, err
    assert "batch   256: test accuracy" in out and "batch  1024: test accuracy" in out
    assert "## 4. Batch-size sweep" in (tmp_path / "s" / "report.md").read_text()
    code, out, err = run_cli(capsys, "warmstart", "--warm-sb-epochs", "2", "--warm-lb-epochs", "1", "--warm-every", "2",
                             "--out", tmp_path / "w", *common)
    assert code == 0, err
    assert "SB epochs     0:" in out and "SB epochs     2:" in out
    result = json.loads((tmp_path / "w" / "results" / "warmstart.json").read_text())
    assert [r["warm_epoch"] for r in result["rows"]] == [0, 2]




def test_incomplete_checkpoint_is_named_with_its_fix(tmp_path, capsys):
    import torch

    argv = ["train", "--batch-size", 512, "--epochs", 1, "--out", tmp_path / "run", *TINY]
    assert run_cli(capsys, *argv)[0] == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_0001.pt"
    payload = torch.load(checkpoint, weights_only=True)
    del payload["optimizer"], payload["x0"]
    torch.save(payload, checkpoint)
    code, out, err = run_cli(capsys, "sharpness", checkpoint, "--out", tmp_path / "s", "--quiet")
    assert code == 1 and "epoch_0001.pt lacks x0" in err and "delete this file" in err and "Traceback" not in err
    argv[argv.index("--epochs") + 1] = 2
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and "epoch_0001.pt lacks x0, optimizer" in err and "Traceback" not in err


# -- a run folder answers for the model it measured ---------------------------------------------------

def _sha256(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _value(out):
    return float(out.split("sharpness (full, ε=0.001): ")[1].split()[0])


def test_a_model_trained_further_is_measured_afresh(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    measure = ["sharpness", "run", "--epsilon", "1e-3", "--quiet", "--threads", 1]
    train_argv = ["train", "--batch-size", 64, "--epochs", 1, "--out", "run", *TINY]
    assert run_cli(capsys, *train_argv)[0] == 0
    first_sha = _sha256(tmp_path / "run" / "model.pt")
    code, out, err = run_cli(capsys, *measure)
    assert code == 0, err
    first = _value(out)

    train_argv[train_argv.index("--epochs") + 1] = 3  # train the same run further
    assert run_cli(capsys, *train_argv)[0] == 0
    sha = _sha256(tmp_path / "run" / "model.pt")
    code, out, err = run_cli(capsys, *measure)
    assert code == 0, err
    again = _value(out)
    code, out, err = run_cli(capsys, *measure, "--out", "fresh")
    assert again == _value(out) != first  # the retrained model's number, as a fresh folder gives it

    first_folder = tmp_path / "hessgap-runs" / f"sharpness-run-{first_sha[:8]}"
    assert sorted(p.name for p in (tmp_path / "hessgap-runs").iterdir()) == sorted(
        [first_folder.name, f"sharpness-run-{sha[:8]}"])
    result = json.loads((first_folder / "results" / "model_sharpness.json").read_text())
    assert result["model_sha256"] == first_sha and result["model"].endswith("model.pt")
    assert first_sha in (first_folder / "report.md").read_text()
    code, out, err = run_cli(capsys, *measure, "--out", first_folder)
    assert code == 1 and "holds results of different settings" in err and "Traceback" not in err
    assert (f"model_sha256: the saved model changed since this folder measured it (sha256 {first_sha[:12]} then, "
            f"{sha[:12]} now): it was trained further or replaced") in err


def test_spectrum_and_interpolate_follow_their_models_too(tmp_path, capsys):
    for name, batch in (("a", 64), ("b", 512)):
        assert main(["train", "--batch-size", str(batch), "--epochs", "1", "--out", str(tmp_path / name), *TINY]) == 0
    spectrum = ["spectrum", tmp_path / "a", "--k", 1, "--out", tmp_path / "e", "--quiet", "--threads", 1]
    between = ["interpolate", tmp_path / "a", tmp_path / "b", "--points", 3, "--out", tmp_path / "i", "--quiet",
               "--threads", 1]
    assert run_cli(capsys, *spectrum)[0] == 0 and run_cli(capsys, *between)[0] == 0
    sha = _sha256(tmp_path / "a" / "model.pt")
    assert json.loads((tmp_path / "e" / "results" / "model_spectrum.json").read_text())["model_sha256"] == sha
    models = json.loads((tmp_path / "i" / "results" / "parametric.json").read_text())["models"]
    assert models["sb"].endswith(f"model.pt (sha256 {sha[:12]})")
    assert main(["train", "--batch-size", "64", "--epochs", "2", "--out", str(tmp_path / "a"), *TINY]) == 0
    for argv in (spectrum, between):
        code, out, err = run_cli(capsys, *argv)
        assert code == 1 and "holds results of different settings" in err and "model_sha256" in err, argv


# -- default folders, and none left behind by a failing command --------------------------------------

def test_default_folders_of_model_files_are_named_after_them(trained_pair, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copy(trained_pair / "sb" / "model.pt", tmp_path / "model.pt")
    shutil.copy(trained_pair / "sb" / "model.pt", tmp_path / "final weights.pt")
    checkpoint = trained_pair / "sb" / "checkpoints" / "epoch_0002.pt"
    for given, label in (("model.pt", tmp_path.name), ("final weights.pt", "final weights"),
                         (checkpoint, "sb-epoch_0002")):
        code, out, err = run_cli(capsys, "sharpness", given, "--epsilon", "1e-3", "--quiet", "--threads", 1)
        assert code == 0, err
        sha = _sha256(tmp_path / given if isinstance(given, str) else given)
        assert (tmp_path / "hessgap-runs" / f"sharpness-{label}-{sha[:8]}" / "report.md").is_file()
    assert len(list((tmp_path / "hessgap-runs").iterdir())) == 3


def test_a_command_that_fails_on_its_inputs_leaves_no_folder(trained_pair, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    code, out, err = run_cli(capsys, "sharpness", "bad.pt", "--quiet")
    assert code == 1 and "bad.pt is corrupt" in err and "rerun the `hessgap train` command that wrote it" in err
    assert "previous epoch" not in err  # not a run's checkpoint: deleting it resumes nothing
    other = tmp_path / "other"
    assert main(["train", "--width", "0.03", "--epochs", "1", "--batch-size", "512", "--out", str(other),
                 "--quiet", "--threads", "1", "--device", "cpu"]) == 0
    code, out, err = run_cli(capsys, "interpolate", trained_pair / "sb", other, "--quiet")
    assert code == 1 and "the two models differ" in err
    code, out, err = run_cli(capsys, "train", "--batch-size", 5000, *TINY)
    assert code == 1 and "larger than the training set" in err
    (tmp_path / "mnist").mkdir()
    code, out, err = run_cli(capsys, "train", "--dataset", "mnist", "--data-root", tmp_path / "mnist", *TINY)
    assert code == 1 and "train-images-idx3-ubyte" in err
    assert not (tmp_path / "hessgap-runs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "mnist", "other"]


# -- one process per run folder ----------------------------------------------------------------------

@pytest.mark.parametrize("command", ["demo", "reproduce", "train", "sharpness", "spectrum", "interpolate", "sweep",
                                     "warmstart", "landscape"])
def test_a_folder_in_use_by_another_process_is_refused_at_once(command, trained_pair, tmp_path, capsys):
    from lock_holder import other_process_holding

    inputs = {"sharpness": [trained_pair / "sb"], "spectrum": [trained_pair / "sb"], "landscape": [trained_pair / "sb"],
              "interpolate": [trained_pair / "sb", trained_pair / "lb"]}.get(command, [])
    with other_process_holding(tmp_path / "run") as holder:
        code, out, err = run_cli(capsys, command, *inputs, "--out", tmp_path / "run", "--quiet", "--device", "cpu")
    assert code == 1 and "Traceback" not in err
    assert f"run folder {tmp_path / 'run'} is in use by another hessgap process (pid {holder.pid})" in err
    assert "choose another --out" in err
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".hessgap.lock"]  # nothing written


def test_sharpness_checks_every_epsilon_before_measuring_any(trained_pair, tmp_path, capsys):
    """Was: ε = 1e-3 measured and kept, then ε = 1e30 refused (the loss overflows in its box), so the folder
    stayed and the rerun with --epsilon 1e-3 alone was refused as different settings. Now the corner where
    the sign ascent starts is evaluated for every ε first: nothing is measured or left behind."""
    folder = tmp_path / "s"
    code, out, err = run_cli(capsys, "sharpness", trained_pair / "lb", "--epsilon", "1e-3", "1e30", "--out", folder,
                             "--quiet", "--threads", 1)
    assert code == 1 and "epsilon=1e+30 is too large for this model" in err and "Usable here, at most" in err, err
    assert not folder.exists()
    code, out, err = run_cli(capsys, "sharpness", trained_pair / "lb", "--epsilon", "1e-3", "--out", folder,
                             "--quiet", "--threads", 1)
    assert code == 0, err
