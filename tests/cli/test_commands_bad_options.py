"""The `hessgap` commands on absurd options: each is refused with one line (status 2 from the parser, 1 for what
only the data or the saved network can tell), before a run folder is made; a command that fails after making
its folder but before finishing anything leaves nothing behind, so the corrected rerun in the same folder runs."""

import re

import pytest

from hessgap.cli import main

TINY = ["--width", "0.02", "--quiet", "--threads", "1", "--device", "cpu"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def parser_refuses(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--batch-size", "512", "--epochs", "1", "--out", str(folder), *TINY]) == 0
    return folder


@pytest.mark.parametrize("option,message", [
    (["--width", "1e9"], r"F1 \(width 1e\+09, depth 1\) on digits has 1.0\de\+24 parameters, 4.1\de\+15 GB as "
                         r"torch.float32; training with adam .* holds 4 copies of them, 1.6\de\+16 GB: more than the "
                         r".* GB of this machine's memory; use a smaller width or depth"),
    (["--width", "1e308"], "beyond the float range"),
    (["--depth", "1e9"], "depth=1e\\+09 gives F1 5,000,000,000 repeated blocks"),
])
def test_a_network_that_cannot_be_built_is_refused_before_the_folder(option, message, tmp_path, capsys):
    """Was: a RuntimeError traceback from torch's allocator (width) or a build that never ended (depth), after the
    run folder, its config.json and lock had been written."""
    code, out, err = run_cli(capsys, "train", *option, "--out", tmp_path / "run", "--quiet", "--device", "cpu")
    assert code == 1 and re.search(message, err) and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,message", [
    (["train", "--epochs", "-1"], "argument --epochs: expected a positive integer, got -1"),
    (["train", "--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
    (["train", "--lr", "nan"], "argument --lr: expected a positive number, got nan"),
    (["train", "--width", "0"], "argument --width: expected a positive number, got 0.0"),
    (["train", "--momentum", "nan"], "argument --momentum: expected a number >= 0, got nan"),
    (["train", "--dropout", "1"], "argument --dropout: expected a number in [0, 1), got 1.0"),
    (["train", "--prox-lambda", "-1"], "argument --prox-lambda: expected a number >= 0, got -1.0"),
    (["train", "--remedy", "dynamic", "--batch-schedule", "16.5", "100", "2"],
     "argument --batch-schedule: expected a positive integer, got '16.5'"),  # was: trained with 16
    (["train", "--remedy", "dynamic", "--batch-schedule", "nan", "100", "2"],
     "argument --batch-schedule: expected a positive integer, got 'nan'"),  # was: ValueError traceback
    (["train", "--remedy", "dynamic", "--batch-schedule", "16", "100", "inf"],
     "argument --batch-schedule: expected a positive number, got inf"),
    (["interpolate", "a", "b", "--alpha-min", "nan"], "argument --alpha-min: expected a finite number, got nan"),
    (["landscape", "m", "--steps", "1"], "argument --steps: expected N or NX,NY, each at least 2, got '1'"),
    (["landscape", "m", "--span", "nan"], "argument --span: expected finite numbers"),
    (["sharpness", "m", "--epsilon", "-1"], "argument --epsilon: expected a positive number, got -1.0"),
    (["sharpness", "m", "--max-batches", "0"], "argument --max-batches: expected a positive integer, got 0"),
    (["spectrum", "m", "--k", "0"], "argument --k: expected a positive integer, got 0"),
])
def test_numeric_options_are_checked_by_the_parser(argv, message, capsys):
    """Was (momentum, dropout, prox-lambda): status 1 from the training options' checks; (alpha nan): a TypeError
    traceback after the whole run."""
    assert message in parser_refuses(capsys, *argv)


def test_a_bad_option_leaves_nothing_and_the_corrected_run_succeeds(saved, tmp_path, capsys):
    """Was: the failed run's config.json (and the full-space result it kept) made the corrected rerun 'results of
    different settings'."""
    out = tmp_path / "s"
    code, _, err = run_cli(capsys, "sharpness", saved, "--epsilon", "1e-3", "--subspace-dim", 10**6, "--out", out,
                           "--quiet")
    assert code == 1 and "--subspace-dim 1000000 is larger than the 1300 parameters" in err and not out.exists()
    code, _, err = run_cli(capsys, "sharpness", saved, "--epsilon", "1e30", "--out", out, "--quiet")
    assert code == 1 and "epsilon=1e+30 is too large for this model in torch.float32" in err
    assert "Usable here, at most: 1.19209e-07 ≤ ε <" in err and "check the model's parameters" not in err
    assert not out.exists()  # made, then removed: nothing was measured
    code, _, err = run_cli(capsys, "sharpness", saved, "--epsilon", "1e-3", "--subspace-dim", 10, "--out", out,
                           "--quiet")
    assert code == 0, err
    code, _, err = run_cli(capsys, "spectrum", saved, "--k", 10**6, "--out", tmp_path / "e", "--quiet")
    assert code == 1 and "asks for more eigenvalues than the Hessian" in err and not (tmp_path / "e").exists()
    assert run_cli(capsys, "spectrum", saved, "--k", 2, "--out", tmp_path / "e", "--quiet")[0] == 0


def test_a_landscape_with_a_span_that_makes_no_grid_leaves_nothing(saved, tmp_path, capsys):
    """Was: refused only after its config.json and random directions were written, and the rerun with a good span
    refused as 'a landscape of other settings'."""
    code, _, err = run_cli(capsys, "landscape", saved, "--span", "0", "--out", tmp_path / "l", "--quiet")
    assert code == 1 and "must be finite and > 0, got 0.0" in err and not (tmp_path / "l").exists()
    code, _, err = run_cli(capsys, "landscape", saved, "--steps", 3, "--out", tmp_path / "l", "--quiet")
    assert code == 0, err


def test_a_training_that_fails_before_its_first_epoch_leaves_nothing(tmp_path, capsys):
    argv = ["train", "--batch-size", 512, "--epochs", 1, "--sharpness-every", 1, "--out", tmp_path / "run", *TINY]
    code, _, err = run_cli(capsys, *argv, "--sharpness-epsilon", "1e30")
    assert code == 1 and "is too large for this model" in err and not (tmp_path / "run").exists()
    assert run_cli(capsys, *argv)[0] == 0


def test_a_training_that_fails_after_an_epoch_keeps_it_and_resumes(tmp_path, capsys):
    argv = ["train", "--batch-size", 512, "--epochs", 2, "--sharpness-every", 2, "--out", tmp_path, *TINY]
    code, _, err = run_cli(capsys, *argv, "--sharpness-epsilon", "1e30")
    assert code == 1 and "is too large for this model" in err
    assert (tmp_path / "checkpoints" / "epoch_0001.pt").is_file()  # the finished epoch stays
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "after epoch 2" in out


@pytest.mark.parametrize("argv,message", [
    (["reproduce", "--experiments", "gap", "--sb-batch", 100_000], "the SB batch size 100000 is larger than the "
                                                                   "training set (1437 samples)"),
    (["sweep", "--sweep-batches", "64,100000"], "the sweep batch size 100000 is larger"),
    (["warmstart", "--width", "1e9"], "has 1.0"),
    (["reproduce", "--depth", "1e9"], "repeated blocks"),
])
def test_experiments_check_sizes_before_the_folder(argv, message, tmp_path, capsys):
    """Was: the folder and config.json written first; reproduce recorded the error of every experiment in it."""
    code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "x", "--quiet", "--threads", 1, "--device", "cpu")
    assert code == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_running_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 131072000000000 bytes.")

    monkeypatch.setattr("hessgap.experiments.model_train.run", no_memory)
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "run", *TINY)
    assert code == 1 and "hessgap: error: out of memory (RuntimeError: [enforce fail" in err
    assert "use a smaller --width or --depth, --batch-size or --eval-batch" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
