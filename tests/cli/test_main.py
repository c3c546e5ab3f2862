"""The `hessgap` parser and entry point: help for every option, `python -m hessgap`, bad names exit with the
choices, the demo takes only data that needs no files."""

import argparse
import subprocess
import sys

import pytest

from hessgap.cli import build_parser, main

SUBCOMMANDS = ("demo", "reproduce", "train", "sharpness", "spectrum", "interpolate", "sweep", "warmstart")


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: hessgap {command}")
    for action in _subparsers()[command]._actions:
        assert action.help and len(action.help) > 15, (command, action.dest)
        if action.option_strings and action.dest not in ("help", "quiet", "trace", "density"):
            assert "default" in action.help or "quick:" in action.help, (command, action.dest)


def test_python_m_hessgap_lists_the_subcommands():
    done = subprocess.run([sys.executable, "-m", "hessgap", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in SUBCOMMANDS:
        assert command in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "F9"], "unknown model 'F9'; choose from F1, F2, C1, C2, C3, C4"),
    (["train", "--dataset", "imagenet"], "choose from digits, mnist1d, mnist, cifar10, cifar100"),
    (["reproduce", "--experiments", "gap,magic"], "choose from gap, sharpness"),
    (["reproduce", "--preset", "huge"], "invalid choice: 'huge'"),
    (["train", "--epochs", "0"], "expected a positive integer, got 0"),
])
def test_bad_names_exit_with_the_choices(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_data_needs_no_files(capsys):
    from hessgap.experiments.demo import demo_settings

    assert demo_settings().dataset == "mnist1d"  # where the gap shows
    assert build_parser().parse_args(["demo"]).dataset == "mnist1d"
    settings = demo_settings(dataset="digits")
    assert settings.dataset == "digits" and settings.experiments == ("gap", "sharpness", "spectrum", "parametric")
    assert settings.seeds >= 2  # mean ± std over seeds
    with pytest.raises(SystemExit) as exit_info:  # data read from files is for `reproduce`, not the demo
        main(["demo", "--dataset", "cifar10"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'cifar10'" in capsys.readouterr().err
