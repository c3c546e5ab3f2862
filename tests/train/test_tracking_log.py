"""Curvature along training (TrainConfig.track): records every track_every optimizer steps, a trajectory that
does not change, records that continue across a resume, and the configuration's checks."""

import json

import pytest

import hessgap
from hessgap.errors import HessgapError
from hessgap.train import train
from hessgap.train.data import make_loader

from tiny_runs import same_weights, tiny, weights, without_time

pytestmark = pytest.mark.usefixtures("one_thread")

TRACKED = dict(track=["lambda_max", "critical_sharpness", "eos_ratio"], track_every=4, track_batches=1)
SGD = dict(optimizer="sgd", lr=0.05, eval_batch_size=256)


def test_tracking_records_every_n_steps_and_leaves_the_trajectory_alone(digits):
    # C1 has dropout: every random stream must continue as without the tracker
    base = dict(model="C1", width=0.1, depth=0.5, batch_size=200, epochs=2, **SGD)
    plain = train(tiny(**base), dataset=digits, progress=False)
    tracked = train(tiny(**{**base, **TRACKED}), dataset=digits, progress=False)
    assert same_weights(weights(plain.model), weights(tracked.model))
    assert without_time(plain.history) == without_time(tracked.history)
    steps = 2 * len(make_loader(digits.train, 200, shuffle=False))  # 8 per epoch (1437 samples)
    assert [r["step"] for r in tracked.tracking] == list(range(4, steps + 1, 4))
    assert plain.tracking == []
    record = tracked.tracking[-1]
    assert record["eos_ratio"] == pytest.approx(record["lambda_max"] * 0.05 / (2 * 1.9), rel=1e-9)
    # the last record measures the final weights over the first 256 training samples, in eval mode
    x, y = digits.train.tensors
    cold = hessgap.eigenvalues(tracked.model, (x[:256], y[:256]), k=1, tol=1e-4)
    assert record["lambda_max"] == pytest.approx(cold.eigenvalues[0], rel=1e-2)
    json.dumps(tracked.to_dict(), allow_nan=False)


def test_records_continue_across_a_resume(digits, tmp_path):
    config = tiny(epochs=3, **SGD, **TRACKED)
    whole = train(config, out_dir=tmp_path / "whole", dataset=digits, progress=False)
    first = train(tiny(**{**config.to_dict(), "epochs": 1}), out_dir=tmp_path / "split", dataset=digits,
                  progress=False)
    resumed = train(config, out_dir=tmp_path / "split", dataset=digits, progress=False)
    assert resumed.resumed_from == 1 and same_weights(weights(whole.model), weights(resumed.model))
    drop = ("seconds",)
    strip = lambda records: [{k: v for k, v in r.items() if k not in drop} for r in records]  # noqa: E731
    assert strip(resumed.tracking) == strip(whole.tracking)  # the same steps, the warm start carried over
    assert strip(first.tracking) == strip(whole.tracking[: len(first.tracking)])
    lines = (tmp_path / "split" / "tracking" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [r["step"] for r in whole.tracking]
    assert (tmp_path / "split" / "tracking" / "tracking.png").exists()
    # a finished run asked again returns its records from the folder
    assert strip(train(config, out_dir=tmp_path / "split", dataset=digits, progress=False).tracking) == \
        strip(whole.tracking)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"track": ["lambda_max"]}, "track and track_every go together"),
        ({"track_every": 5}, "track and track_every go together"),
        ({"track": ["gap"], "track_every": 5}, "unknown tracked measure 'gap'"),
        ({"track": ["relative_critical_sharpness"], "track_every": 5}, "unknown tracked measure"),
        ({"track": "lambda_max", "track_every": 5}, "track must be a list"),
        ({"track": ["eos_ratio"], "track_every": 5, "optimizer": "adam"}, "eos_ratio is SGD's"),
        ({"track": ["trace"], "track_every": 5, "track_batches": 0}, "track_batches must be a positive integer"),
    ],
)
def test_bad_tracking_settings(changes, message):
    with pytest.raises(HessgapError, match=message):
        tiny(**changes).validate()
