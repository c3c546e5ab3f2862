"""Checkpoints: a corrupt one is named and the others are kept, pruning keeps the start, writes are atomic."""

import json

import pytest

from hessgap.errors import HessgapError
from hessgap.train import list_checkpoints, load_epoch_state, train
from hessgap.train.checkpoint import checkpoint_path

from tiny_runs import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_corrupt_checkpoint_names_the_file_and_keeps_the_others(digits, tmp_path):
    train(tiny(epochs=2), out_dir=tmp_path, dataset=digits, progress=False)
    latest = checkpoint_path(tmp_path, 2)
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.raises(HessgapError, match=r"epoch_0002\.pt is corrupt"):
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
