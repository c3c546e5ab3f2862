"""hessgap's Python calls that read a checkpoint or model file never run code a crafted file names: they
refuse it with an error naming the file, and what hessgap writes itself always loads as tensors and plain data."""

import shutil

import numpy as np
import pytest
import torch

from hessgap.errors import HessgapError
from hessgap.experiments import saved
from hessgap.train import TrainResult, list_checkpoints, load_checkpoint, load_epoch_state, train
from hessgap.train.checkpoint import checkpoint_path

from crafted import craft
from tiny_runs import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def genuine_run(tmp_path_factory, digits):
    """A finished two-epoch run folder with its model.pt."""
    folder = tmp_path_factory.mktemp("run")
    train(tiny(epochs=2), out_dir=folder, dataset=digits, progress=False).save(folder / "model.pt")
    return folder


def _crafted_run(genuine_run, tmp_path):
    """A copy of the run whose latest checkpoint and model.pt each hold an entry that runs code when loaded."""
    folder = tmp_path / "run"
    shutil.copytree(genuine_run, folder)
    marker = tmp_path / "code-ran"
    craft(genuine_run / "model.pt", folder / "model.pt", marker)
    craft(checkpoint_path(genuine_run, 2), checkpoint_path(folder, 2), marker)
    return folder, marker


ENTRY_POINTS = {
    "load_checkpoint": lambda folder: load_checkpoint(checkpoint_path(folder, 2)),
    "load_epoch_state": lambda folder: load_epoch_state(folder, 2),
    "TrainResult.load file": lambda folder: TrainResult.load(folder / "model.pt"),
    "TrainResult.load folder": lambda folder: TrainResult.load(folder / "checkpoints" / ".."),
    "experiments.saved.load": lambda folder: saved.load(folder / "model.pt", device="cpu"),
}
READS = {"load_checkpoint": "epoch_0002.pt", "load_epoch_state": "epoch_0002.pt", "TrainResult.load file": "model.pt",
         "TrainResult.load folder": "epoch_0002.pt", "experiments.saved.load": "model.pt"}


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_a_crafted_file_is_refused_without_running_its_code(genuine_run, tmp_path, entry_point):
    folder, marker = _crafted_run(genuine_run, tmp_path)
    with pytest.raises(HessgapError, match=rf"{READS[entry_point]} holds objects other than tensors and plain data "
                                           r"\(builtins\.exec\); hessgap will not load it.*can run code") as info:
        ENTRY_POINTS[entry_point](folder)
    assert not marker.exists()
    assert "weights_only=False" not in str(info.value)  # torch's advice to load it anyway is not passed on


def test_resuming_a_run_from_a_crafted_checkpoint_is_refused(genuine_run, tmp_path, digits):
    folder, marker = _crafted_run(genuine_run, tmp_path)
    with pytest.raises(HessgapError, match=r"epoch_0002\.pt holds objects other than tensors.*delete this file"):
        train(tiny(epochs=3), out_dir=folder, dataset=digits, progress=False)
    assert not marker.exists()


def test_a_crafted_file_in_the_legacy_format_is_refused(genuine_run, tmp_path):
    marker = tmp_path / "code-ran"
    crafted = craft(genuine_run / "model.pt", tmp_path / "model.pt", marker, zip_format=False)
    with pytest.raises(HessgapError, match=r"model\.pt holds objects other than tensors and plain data \(exec\)"):
        TrainResult.load(crafted)
    assert not marker.exists()


def test_torchs_environment_switch_does_not_turn_the_check_off(genuine_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    folder, marker = _crafted_run(genuine_run, tmp_path)
    with pytest.raises(HessgapError, match="holds objects other than tensors"):
        TrainResult.load(folder / "model.pt")
    assert not marker.exists()


def test_every_file_a_run_writes_loads_as_tensors_and_plain_data(genuine_run):
    for path in [*list_checkpoints(genuine_run).values(), genuine_run / "model.pt"]:
        torch.load(path, weights_only=True)  # raises on anything else
    state = load_checkpoint(checkpoint_path(genuine_run, 2), needs=("rng", "optimizer", "config"))
    assert isinstance(state["config"], dict) and isinstance(state["rng"]["torch"], torch.Tensor)


def test_numpy_numbers_in_a_configuration_are_written_as_python_numbers(tmp_path, digits):
    # a numpy scalar pickles through numpy's functions, which loading refuses: the run could not resume
    config = tiny(epochs=1, lr=np.float64(2e-3), width=np.float32(0.0625))
    train(config, out_dir=tmp_path / "run", dataset=digits, progress=False).save(tmp_path / "model.pt")
    resumed = train(tiny(epochs=2, lr=2e-3, width=0.0625), out_dir=tmp_path / "run", dataset=digits, progress=False)
    assert resumed.resumed_from == 1 and len(resumed.history) == 2
    for path in (checkpoint_path(tmp_path / "run", 1), tmp_path / "model.pt"):
        written = torch.load(path, weights_only=True)["config"]
        assert type(written["lr"]) is float and written["lr"] == 2e-3 and written["width"] == 0.0625
