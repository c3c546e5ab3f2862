"""SharpnessLog: Metric 2.1 along training, written into the epoch's record before its checkpoint,
without changing the trajectory."""

import json

import pytest
import torch

from hessgap.sharp import sharpness
from hessgap.train import make_loader, train
from hessgap.train.checkpoint import checkpoint_path, load_checkpoint
from hessgap.train.sharpness_log import SharpnessLog

from tiny_runs import same_weights, tiny, weights, without_time

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sharpness_is_recorded_without_changing_the_trajectory(digits):
    plain = train(tiny(epochs=2), dataset=digits, progress=False)
    measured = train(tiny(epochs=2, sharpness_every=2, sharpness_batches=1, eval_batch_size=256),
                     dataset=digits, progress=False)
    assert measured.history[0]["sharpness"] is None
    assert measured.history[1]["sharpness"] > 0
    assert same_weights(weights(plain.model), weights(measured.model))


def test_measured_every_n_epochs_and_at_the_last():
    log = SharpnessLog(None, every=3)
    assert [e for e in range(1, 8) if log.due(e, last=e == 7)] == [3, 6, 7]
    assert not any(SharpnessLog(None, every=0).due(e, last=True) for e in range(1, 4))


def test_the_value_is_checkpointed_before_the_callers_callback_sees_it(digits, tmp_path):
    config = tiny(epochs=2, sharpness_every=1, sharpness_batches=1, eval_batch_size=256)
    seen = []

    def callback(record, model):
        saved = load_checkpoint(checkpoint_path(tmp_path, record["epoch"]))["history"][-1]
        seen.append((record["sharpness"], saved["sharpness"], saved.get("sharpness_seconds")))
        # the metric at these weights, over the same data: what the log wrote into the record
        direct = sharpness(model, make_loader(digits.train, 256, shuffle=False), epsilon=1e-3, max_batches=1)
        assert record["sharpness"] == pytest.approx(direct.value, rel=1e-6)

    train(config, out_dir=tmp_path, dataset=digits, progress=False, epoch_callback=callback)
    assert len(seen) == 2 and all(value > 0 and value == stored and took > 0 for value, stored, took in seen)
    history = json.loads((tmp_path / "history.json").read_text())["history"]
    assert [h["sharpness"] for h in history] == [s[0] for s in seen]


def test_resuming_a_measured_run_is_bit_exact(digits, tmp_path):
    config = tiny(epochs=3, sharpness_every=2, sharpness_batches=1, eval_batch_size=256)
    whole = train(config, out_dir=tmp_path / "whole", dataset=digits, progress=False)

    def interrupt(record, model):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # after epoch 2's measurement and checkpoint
        train(config, out_dir=tmp_path / "split", dataset=digits, progress=False, epoch_callback=interrupt)
    resumed = train(config, out_dir=tmp_path / "split", dataset=digits, progress=False)
    assert resumed.resumed_from == 2 and same_weights(weights(whole.model), weights(resumed.model))
    strip = lambda history: [{k: v for k, v in h.items() if k != "sharpness_seconds"} for h in without_time(history)]
    assert strip(whole.history) == strip(resumed.history)
    assert [h["sharpness"] is not None for h in resumed.history] == [False, True, True]
    assert torch.equal(whole.x0, resumed.x0)
