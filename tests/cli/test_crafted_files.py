"""No command runs code that a crafted model file or checkpoint names: each refuses the file with one line
naming it (exit status 1, no traceback) and the code never runs."""

import shutil

import pytest

from hessgap.cli import main

from crafted import craft

TINY = ["--width", "0.02", "--quiet", "--threads", "1", "--device", "cpu"]
TRAIN = ["train", "--batch-size", "512", "--epochs", "1", *TINY]


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """A `hessgap train` folder (one epoch): its model.pt and checkpoints."""
    folder = tmp_path_factory.mktemp("cli") / "run"
    assert main([*TRAIN, "--out", str(folder)]) == 0
    return folder


def _command(name, genuine, crafted_model, crafted_run, out):
    """The command line of case ``name``, and the file it must refuse."""
    good, common = genuine / "model.pt", ["--out", out, "--quiet", "--threads", "1", "--device", "cpu"]
    return {
        "sharpness": (["sharpness", crafted_model, *common], crafted_model),
        "spectrum": (["spectrum", crafted_model, *common], crafted_model),
        "landscape": (["landscape", crafted_model, *common], crafted_model),
        "landscape --directions": (["landscape", good, "--directions", crafted_model, *common], crafted_model),
        "measures": (["measures", crafted_model, *common], crafted_model),
        "interpolate, first": (["interpolate", crafted_model, good, *common], crafted_model),
        "interpolate, second": (["interpolate", good, crafted_model, *common], crafted_model),
        "train, resuming": ([*TRAIN, "--epochs", "2", "--out", crafted_run],
                            crafted_run / "checkpoints" / "epoch_0001.pt"),
    }[name]


CASES = ["sharpness", "spectrum", "landscape", "landscape --directions", "measures", "interpolate, first",
         "interpolate, second", "train, resuming"]


@pytest.mark.parametrize("case", CASES)
def test_a_command_refuses_a_crafted_file_without_running_its_code(genuine, tmp_path, capsys, case):
    marker = tmp_path / "code-ran"
    crafted_model = craft(genuine / "model.pt", tmp_path / "crafted" / "model.pt", marker)
    crafted_run = tmp_path / "run"
    shutil.copytree(genuine, crafted_run)
    craft(genuine / "checkpoints" / "epoch_0001.pt", crafted_run / "checkpoints" / "epoch_0001.pt", marker)
    argv, refused = _command(case, genuine, crafted_model, crafted_run, tmp_path / "out")
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert code == 1 and "Traceback" not in err
    assert f"{refused} holds objects other than tensors and plain data (builtins.exec); hessgap will not load it" in err
