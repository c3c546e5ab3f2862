"""The command line's names and value types: its choices are hessgap.names' and the registry's, and its
argparse types are the checks of hessgap._checks in argparse's words."""

import argparse

import pytest

from hessgap import names
from hessgap.cli import build_parser, options
from hessgap.experiments import registry


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _option(command, flag):
    return next(a for a in _subparsers()[command]._actions if flag in a.option_strings)


@pytest.mark.parametrize("command, flag, expected", [
    ("reproduce", "--preset", names.PRESET_NAMES),
    ("sweep", "--preset", names.PRESET_NAMES),
    ("warmstart", "--preset", names.PRESET_NAMES),
    ("reproduce", "--optimizer", names.OPTIMIZER_NAMES),
    ("train", "--optimizer", names.OPTIMIZER_NAMES),
    ("train", "--remedy", names.REMEDY_NAMES),
    ("reproduce", "--solver", names.SHARPNESS_SOLVERS),
    ("sharpness", "--solver", names.SHARPNESS_SOLVERS),
    ("demo", "--dataset", tuple(n for n in names.DATASET_NAMES if n not in names.DATASETS_ON_DISK)),
])
def test_choices_are_the_names_modules(command, flag, expected):
    assert tuple(_option(command, flag).choices) == tuple(expected)


def test_the_solver_default_is_auto():
    assert _option("sharpness", "--solver").default == "auto"
    args = build_parser().parse_args(["sharpness", "model.pt"])
    assert args.solver == "auto"


def test_every_name_parses_and_unknown_names_list_them_all(capsys):
    parser = build_parser()
    for model in names.MODEL_NAMES:
        assert parser.parse_args(["train", "--model", model.lower()]).model == model
    for dataset in names.DATASET_NAMES:
        assert parser.parse_args(["train", "--dataset", dataset]).dataset == dataset
    everything = ",".join(registry.EXPERIMENTS)
    assert parser.parse_args(["reproduce", "--experiments", everything]).experiments == registry.EXPERIMENTS
    remedies = ",".join(names.REMEDY_NAMES)
    assert parser.parse_args(["reproduce", "--remedies", remedies]).remedies == names.REMEDY_NAMES
    tracked = ",".join(names.TRAIN_TRACK_MEASURES)
    assert parser.parse_args(["train", "--track", tracked]).track == names.TRAIN_TRACK_MEASURES
    for argv, listed in ((["train", "--track", "lambda_max,relative_critical_sharpness"], names.TRAIN_TRACK_MEASURES),
                         (["train", "--model", "F9"], names.MODEL_NAMES),
                         (["train", "--dataset", "svhn"], names.DATASET_NAMES),
                         (["reproduce", "--experiments", "train"], registry.EXPERIMENTS),  # a result kind, not an experiment
                         (["reproduce", "--remedies", "mixup"], names.REMEDY_NAMES)):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert f"choose from {', '.join(listed)}" in capsys.readouterr().err


@pytest.mark.parametrize("kind, text, value, message", [
    (options.positive_int, "3", 3, None),
    (options.positive_int, "0", None, "expected a positive integer, got 0"),
    (options.positive_int, "1.5", None, "expected a positive integer, got '1.5'"),
    (options.nonnegative_int, "0", 0, None),
    (options.nonnegative_int, "-1", None, "expected an integer >= 0, got -1"),
    (options.positive_float, "1e-3", 1e-3, None),
    (options.positive_float, "inf", None, "expected a positive number, got inf"),
    (options.positive_float, "x", None, "expected a positive number, got 'x'"),
])
def test_number_types_check_with_hessgaps_checks(kind, text, value, message):
    if message is None:
        assert kind(text) == value
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            kind(text)


@pytest.mark.parametrize("command", ["demo", "train", "reproduce", "sharpness"])
def test_negative_seed_is_refused(command, capsys):
    argv = [command] + (["model.pt"] if command == "sharpness" else []) + ["--seed", "-1"]
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert "--seed: expected an integer >= 0, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("command, flag, expected", [
    ("reproduce", "--preprocess", names.PREPROCESS_NAMES),
    ("train", "--preprocess", names.PREPROCESS_NAMES),
    ("sweep", "--init", names.INIT_NAMES),
    ("train", "--init", names.INIT_NAMES),
    ("warmstart", "--stop", names.STOP_RULES),
    ("reproduce", "--sharpness-batchnorm", names.BATCHNORM_MODES),
    ("train", "--sharpness-batchnorm", names.BATCHNORM_MODES),
    ("train", "--sharpness-solver", names.SHARPNESS_SOLVERS),
    ("sharpness", "--batchnorm", names.BATCHNORM_MODES),
])
def test_the_papers_options_take_the_names_modules_choices(command, flag, expected):
    assert tuple(_option(command, flag).choices) == tuple(expected)


def test_the_papers_options_override_a_preset_and_default_to_it():
    from hessgap.experiments import preset

    parser = build_parser()
    untouched = options.settings_from(parser.parse_args(["reproduce", "--preset", "paper"]), preset("paper"))
    assert untouched == preset("paper").replace(device="auto")
    argv = ["reproduce", "--preset", "paper", "--preprocess", "standardize", "--init", "pytorch", "--no-conv-dropout",
            "--stop", "epochs", "--max-epochs", "50", "--min-delta", "1e-4", "--sharpness-batchnorm", "eval",
            "--solver", "auto", "--warm-every", "10"]
    s = options.settings_from(parser.parse_args(argv), preset("paper"))
    assert (s.preprocess, s.init, s.conv_dropout, s.stop, s.max_epochs, s.min_delta) == \
        ("standardize", "pytorch", False, "epochs", 50, 1e-4)
    assert (s.sharpness_batchnorm, s.sharpness_solver, s.warmstart_every) == ("eval", "auto", 10)
    quick = options.settings_from(parser.parse_args(["sweep", "--conv-dropout", "--stop", "plateau", "--patience", "3"]),
                                  preset("quick"))
    assert quick.conv_dropout and quick.stop == "plateau" and quick.patience == 3
    train = parser.parse_args(["train"])
    assert (train.preprocess, train.init, train.conv_dropout, train.min_delta) == ("standardize", "pytorch", False, 0.0)
    assert (train.sharpness_solver, train.sharpness_batchnorm) == ("auto", "eval")
    assert options.nonnegative_float("0") == 0.0
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number >= 0, got -1.0"):
        options.nonnegative_float("-1")
