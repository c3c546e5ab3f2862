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


def _dropout_net():
    torch.manual_seed(0)
    from hessgap.train.models import build_model

    return build_model("C1", (1, 8, 8), 10, width=0.1, dropout=0.5)


def test_batchnorm_batch_statistics_change_the_metric_and_keep_it_deterministic(digits):
    from hessgap.train.sharpness_log import measure_sharpness

    result = train(tiny(epochs=2), dataset=digits, progress=False)
    loader = make_loader(digits.train, 512, shuffle=False)
    before = weights(result.model)
    eval_mode = measure_sharpness(result.model, loader, 1e-3, batchnorm="eval")
    batch_stats = measure_sharpness(result.model, loader, 1e-3, batchnorm="train")
    assert not eval_mode.train_mode and batch_stats.train_mode
    assert batch_stats.loss != pytest.approx(eval_mode.loss, rel=1e-3)  # f(x) itself differs
    assert batch_stats.value != pytest.approx(eval_mode.value, rel=1e-2)
    assert same_weights(before, weights(result.model)) and not result.model.training  # buffers and mode kept
    reference = sharpness(result.model, loader, epsilon=1e-3, train_mode=True)
    assert batch_stats.value == reference.value  # F1 has no dropout: exactly the metric's train mode

    net = _dropout_net()  # with dropout, train mode alone would draw new masks at every evaluation
    data = make_loader(digits.train, 512, shuffle=False)
    first = measure_sharpness(net, data, 1e-3, batchnorm="train", solver="box-ascent")
    second = measure_sharpness(net, data, 1e-3, batchnorm="train", solver="box-ascent")
    assert first.value == second.value and first.loss == second.loss
    assert [m.p for m in net if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]  # the rates are put back
    with pytest.raises(Exception, match="unknown sharpness BatchNorm mode 'batch'"):
        measure_sharpness(net, data, 1e-3, batchnorm="batch")


def test_the_log_measures_with_the_configured_solver_and_batchnorm(digits):
    run = train(tiny(epochs=1, sharpness_every=1, sharpness_batches=1, eval_batch_size=256,
                     sharpness_solver="lbfgsb", sharpness_batchnorm="train"), dataset=digits, progress=False)
    reference = sharpness(run.model, make_loader(digits.train, 256, shuffle=False), epsilon=1e-3, max_batches=1,
                          solver="lbfgsb", train_mode=True)
    assert run.history[0]["sharpness"] == pytest.approx(reference.value, rel=1e-6)
