"""TrainResult: save and load a trained network from its file, a run's checkpoint or a run folder."""

import pytest
import torch

from hessgap.errors import HessgapError
from hessgap.train import TrainResult, train
from hessgap.train.checkpoint import checkpoint_path

from tiny_runs import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_result_save_and_load(digits, tmp_path):
    result = train(tiny(model="C2", width=0.05, depth=0.34, epochs=1), dataset=digits, progress=False)
    result.save(tmp_path / "result.pt")
    loaded = TrainResult.load(tmp_path / "result.pt")
    x = digits.test.tensors[0][:16]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), result.model(x), rtol=0, atol=0)
    assert loaded.history == result.history and torch.equal(loaded.x0, result.x0)
    assert loaded.config == result.config and loaded.final == result.final
    train(tiny(epochs=1), out_dir=tmp_path / "run", dataset=digits, progress=False)
    epoch_file = TrainResult.load(checkpoint_path(tmp_path / "run", 1))
    assert len(epoch_file.history) == 1 and epoch_file.config.model == "F1"  # a run's checkpoint loads too
    with pytest.raises(HessgapError, match="no training checkpoints"):
        TrainResult.load(tmp_path / "run" / "checkpoints")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(HessgapError, match="bad.pt"):
        TrainResult.load(tmp_path / "bad.pt")
