"""The ``hessgap landscape`` command's options and run, with a stand-in for the command line's model loading."""

import json

import pytest

from hessgap.cli import build_parser
from hessgap.errors import HessgapError
from hessgap.landscape import command

pytestmark = pytest.mark.usefixtures("one_thread")


class parser:
    """The command line's ``landscape`` subcommand, parsed without the subcommand's name."""

    def parse_args(self, argv):
        return build_parser().parse_args(["landscape", *argv])


@pytest.fixture
def load(ref):
    saved = {"a": ref.mlp(0), "b": ref.mlp(1), "c": ref.mlp(2)}
    calls = []

    def load(path):
        calls.append(path)
        return saved[path], ref.batches((3, 4)), ref.batches((3, 4), samples=12, sizes=(12,), seed=5)

    load.calls = calls
    return load


def test_a_random_plane_then_a_resumed_rerun(tmp_path, load, capsys):
    args = parser().parse_args(["a", "--steps", "3,4", "--span", "0.5", "--test", "--quiet"])
    result = command.run(args, load=load, out_dir=tmp_path)
    assert result.loss.shape == (4, 3) and result.test_loss is not None and result.passes == 4
    printed = capsys.readouterr().out
    assert "landscape: 3 × 4 points, random directions, stack engine" in printed and "lowest training loss" in printed
    assert json.loads((tmp_path / "config.json").read_text())["settings"]["span"] == 0.5
    again = command.run(args, load=load, out_dir=tmp_path)
    assert again.rows_resumed == 4 and again.passes == 0


def test_paths_and_planes_between_saved_models(tmp_path, load):
    args = parser().parse_args(["a", "--directions", "b", "--path", "curved", "--steps", "5", "--quiet"])
    line = command.run(args, load=load, out_dir=tmp_path / "line")
    assert line.kind == "model" and line.settings["path"] == "curved" and line.x[0] == -1 and line.x[-1] == 2
    args = parser().parse_args(["a", "--directions", "b,c", "--steps", "3", "--span", "0,1,0,0.5", "--quiet"])
    plane = command.run(args, load=load, out_dir=tmp_path / "plane")
    assert plane.kind == "models" and plane.y[-1] == 0.5 and load.calls.count("c") == 1


def test_options_and_their_errors(load, tmp_path):
    options = command.options(parser().parse_args(["a", "--ignore", "none", "--memory-budget", "0.5",
                                                   "--directions", "hessian-min", "--dims", "1"]), load)
    assert options["ignore"] is None and options["memory_budget"] == 2**29 and options["directions"] == "hessian-min"
    with pytest.raises(SystemExit):
        parser().parse_args(["a", "--steps", "3,4,5"])
    with pytest.raises(SystemExit):
        parser().parse_args(["a", "--span", "1,2,3"])
    with pytest.raises(SystemExit):  # a number of steps or a span that is no grid at all: the parser's error
        parser().parse_args(["a", "--steps", "1"])
    no_grid = ((["--steps", "3,4", "--dims", "1"], "steps must be one integer ≥ 2"),
               (["--span", "0"], "must be finite and > 0, got 0.0"),
               (["--directions", "b,c", "--span", "2,1"], r"span must be \(low, high\) with low < high"))
    for case, (argv, match) in enumerate(no_grid):
        args = parser().parse_args(["a", *argv, "--quiet"])
        with pytest.raises(HessgapError, match=match):  # before anything is loaded or written
            command.check_grid(args)
        with pytest.raises(HessgapError, match=match):
            command.run(args, load=load, out_dir=tmp_path / str(case))


def test_a_large_grid_prints_a_warning_line_and_a_huge_one_is_refused(tmp_path, load, capsys, monkeypatch):
    from hessgap.landscape import surface

    monkeypatch.setattr(surface, "WARN_POINTS", 11)
    command.run(parser().parse_args(["a", "--steps", "3,4", "--quiet"]), load=load, out_dir=tmp_path / "warned")
    err = capsys.readouterr().err
    assert err.startswith("hessgap: warning: a landscape grid of 3 × 4 = 12 points, each one evaluation of the loss "
                          "over the data: about ") and err.count("\n") == 1
    with pytest.raises(HessgapError, match="100000 × 100000 = 1e\\+10 points needs about .* fewer steps"):
        command.run(parser().parse_args(["a", "--steps", "100000", "--quiet"]), load=load, out_dir=tmp_path / "huge")
    assert not (tmp_path / "huge").exists()  # refused before the folder was made


def test_another_batch_size_is_named_on_resume(tmp_path, load):
    command.run(parser().parse_args(["a", "--steps", "3", "--quiet"]), load=load, out_dir=tmp_path)
    with pytest.raises(HessgapError, match=r"changed: data_settings \(\{'eval_batch': 1024\} in the folder, "
                                           r"\{'eval_batch': 32\} now\)"):
        command.run(parser().parse_args(["a", "--steps", "3", "--eval-batch", "32", "--quiet"]), load=load,
                    out_dir=tmp_path)
