"""Checkpoints: a corrupt one is named and the others are kept, pruning keeps the start, writes are atomic."""

import json

import pytest
import torch

from hessgap.errors import HessgapError
from hessgap.train import TrainResult, list_checkpoints, load_epoch_state, train
from hessgap.train.checkpoint import checkpoint_path

from tiny_runs import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_corrupt_checkpoint_names_the_file_and_keeps_the_others(digits, tmp_path):
    train(tiny(epochs=2), out_dir=tmp_path, dataset=digits, progress=False)
    latest = checkpoint_path(tmp_path, 2)
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.raises(HessgapError, match=r"epoch_0002\.pt is corrupt.*delete this file to resume from the previous"):
        train(tiny(epochs=3), out_dir=tmp_path, dataset=digits, progress=False)
    assert load_epoch_state(tmp_path, 1)  # the earlier epochs are intact
    latest.unlink()  # as the message says: delete it and resume from the epoch before
    assert len(train(tiny(epochs=3), out_dir=tmp_path, dataset=digits, progress=False).history) == 3
    for path in list_checkpoints(tmp_path).values():
        path.unlink()
    with pytest.raises(HessgapError, match="holds no checkpoint to resume from"):  # the history is not overwritten
        train(tiny(epochs=3), out_dir=tmp_path, dataset=digits, progress=False)
    assert len(json.loads((tmp_path / "history.json").read_text())["history"]) == 3


def test_keep_checkpoints_prunes_the_oldest_but_keeps_the_start(digits, tmp_path):
    config = tiny(epochs=4, keep_checkpoints=2)
    train(config, out_dir=tmp_path, dataset=digits, progress=False)
    assert sorted(list_checkpoints(tmp_path)) == [0, 3, 4]
    with pytest.raises(HessgapError, match="available epochs: \\[0, 3, 4\\]"):
        load_epoch_state(tmp_path, 1)
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.suffix == ".tmp"]
    assert leftovers == []  # atomic writes leave no temporary files behind


def _drop(path, *keys):
    payload = torch.load(path, weights_only=True)
    for key in keys:
        del payload[key]
    torch.save(payload, path)


def test_checkpoint_missing_entries_names_them_and_the_fix(digits, tmp_path):
    train(tiny(epochs=2), out_dir=tmp_path, dataset=digits, progress=False)
    latest = checkpoint_path(tmp_path, 2)
    _drop(latest, "optimizer", "rng")
    with pytest.raises(HessgapError, match=r"epoch_0002\.pt lacks optimizer, rng.*delete this file to resume from "
                                           r"the previous epoch's checkpoint, or use a new folder"):
        train(tiny(epochs=3), out_dir=tmp_path, dataset=digits, progress=False)
    latest.unlink()  # as the message says
    assert len(train(tiny(epochs=3), out_dir=tmp_path, dataset=digits, progress=False).history) == 3


def test_checkpoint_whose_model_does_not_fit_is_refused_clearly(digits, tmp_path):
    train(tiny(epochs=1), out_dir=tmp_path, dataset=digits, progress=False)
    latest = checkpoint_path(tmp_path, 1)
    payload = torch.load(latest, weights_only=True)
    payload["model"].pop(next(iter(payload["model"])))
    torch.save(payload, latest)
    with pytest.raises(HessgapError, match=r"epoch_0001\.pt does not fit .*Missing key.*delete this file"):
        train(tiny(epochs=2), out_dir=tmp_path, dataset=digits, progress=False)


def test_result_file_missing_entries_names_them(digits, tmp_path):
    result = train(tiny(epochs=1), out_dir=tmp_path / "run", dataset=digits, progress=False)
    result.save(tmp_path / "model.pt")
    _drop(tmp_path / "model.pt", "x0", "num_classes")
    with pytest.raises(HessgapError, match=r"model\.pt lacks x0, num_classes.*rerun the `hessgap train` command"):
        TrainResult.load(tmp_path / "model.pt")
    _drop(checkpoint_path(tmp_path / "run", 1), "input_shape")
    with pytest.raises(HessgapError, match=r"epoch_0001\.pt lacks input_shape.*delete this file"):
        TrainResult.load(tmp_path / "run")
